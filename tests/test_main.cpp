// Shared main for every Catch2 test executable: MPI is initialised (a singleton when there is
// no launcher), the Catch2 session runs on every rank, and the job's exit code is the worst
// rank's, so `mpirun -np 4 test_x` fails when any rank fails.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <mpi.h>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int result = Catch::Session().run(argc, argv);
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
