#include "core/trainer.h"

#include "core/error.h"

namespace ulysses {

int run_train(const Config&, MpiRuntime&) {
  throw UserError("ulysses train: the trainer is not built yet");
}

}  // namespace ulysses
