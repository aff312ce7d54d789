# End-to-end test of the `ulysses` command line (run by CTest as `cmake -P`):
#   bad config / bad --set / bad option / no subcommand -> exit 2 and the documented message;
#   --version and --print-config -> exit 0; --print-config output reloads to the same config;
#   under mpirun -np 2 a config error ends both ranks with exit 2 and is printed once;
#   runtime.device=cuda / parallel.backend=nccl without a GPU -> exit 2 naming the key.
# Inputs: -DULYSSES=<executable> -DMPIEXEC=<mpirun> -DWORK_DIR=<scratch directory>
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(failures 0)

# run_case(NAME name EXIT code [EXPECT_ERR text] [EXPECT_OUT text] ARGS ...)
# Runs ARGS (a full command line), checks the exit code and that stderr/stdout contain the texts.
function(run_case)
  cmake_parse_arguments(C "" "NAME;EXIT;EXPECT_ERR;EXPECT_OUT;OUT_FILE" "ARGS" ${ARGN})
  execute_process(COMMAND ${C_ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT 120)
  set(ok TRUE)
  if(NOT "${rc}" STREQUAL "${C_EXIT}")
    set(ok FALSE)
    message("FAIL ${C_NAME}: exit code '${rc}', expected ${C_EXIT}")
  endif()
  if(DEFINED C_EXPECT_ERR)
    string(FIND "${err}" "${C_EXPECT_ERR}" pos)
    if(pos EQUAL -1)
      set(ok FALSE)
      message("FAIL ${C_NAME}: stderr lacks '${C_EXPECT_ERR}'")
    endif()
  endif()
  if(DEFINED C_EXPECT_OUT)
    string(FIND "${out}" "${C_EXPECT_OUT}" pos)
    if(pos EQUAL -1)
      set(ok FALSE)
      message("FAIL ${C_NAME}: stdout lacks '${C_EXPECT_OUT}'")
    endif()
  endif()
  if(DEFINED C_OUT_FILE)
    file(WRITE ${C_OUT_FILE} "${out}")
  endif()
  if(ok)
    message("ok   ${C_NAME}")
  else()
    message("     stdout: ${out}\n     stderr: ${err}")
    math(EXPR n "${failures} + 1")
    set(failures ${n} PARENT_SCOPE)
  endif()
  set(last_err "${err}" PARENT_SCOPE)
  set(last_out "${out}" PARENT_SCOPE)
endfunction()

set(bad ${WORK_DIR}/bad.yaml)
file(WRITE ${bad} "data:\n  source: synthetic\ntrain:\n  lrr: 0.1\n")

run_case(NAME "bad config" EXIT 2
         EXPECT_ERR "error: ${bad}:4:3: unknown key 'train.lrr' (did you mean 'train.lr'?)"
         ARGS ${ULYSSES} train --config ${bad})
run_case(NAME "bad --set value" EXIT 2
         EXPECT_ERR "error: --set train.lr=-1: key 'train.lr': expected a positive number, got '-1'"
         ARGS ${ULYSSES} check --set train.lr=-1)
run_case(NAME "missing config file" EXIT 2 EXPECT_ERR "error: ${WORK_DIR}/none.yaml: cannot open"
         ARGS ${ULYSSES} train --config ${WORK_DIR}/none.yaml)
run_case(NAME "unknown option" EXIT 2 EXPECT_ERR "--frobnicate"
         ARGS ${ULYSSES} train --frobnicate)
run_case(NAME "bad --log-level" EXIT 2 EXPECT_ERR "--log-level"
         ARGS ${ULYSSES} train --log-level verbose)
run_case(NAME "no subcommand" EXIT 2 EXPECT_ERR "subcommand" ARGS ${ULYSSES})
run_case(NAME "prepare without --out" EXIT 2 EXPECT_ERR "--out" ARGS ${ULYSSES} prepare in.txt)
run_case(NAME "--version" EXIT 0 EXPECT_OUT "ulysses 0.1.0 (CUDA" ARGS ${ULYSSES} --version)
run_case(NAME "--help" EXIT 0 EXPECT_OUT "train" ARGS ${ULYSSES} --help)

# --print-config: the resolved YAML, which loads back to the same YAML (apart from the source line).
run_case(NAME "--print-config" EXIT 0 EXPECT_OUT "  n_layer: 6\n" OUT_FILE ${WORK_DIR}/printed.yaml
         ARGS ${ULYSSES} train --print-config --set model.n_layer=6 --set train.lr=0.000123
              --log-level debug)
string(FIND "${last_out}" "  lr: 0.000123\n" lr_pos)
string(FIND "${last_out}" "  level: debug\n" level_pos)
if(lr_pos EQUAL -1 OR level_pos EQUAL -1)
  message("FAIL --print-config: the overrides are not in the printed config")
  math(EXPR failures "${failures} + 1")
endif()
set(first_print "${last_out}")
run_case(NAME "--print-config of the printed config" EXIT 0
         ARGS ${ULYSSES} train --print-config --config ${WORK_DIR}/printed.yaml)
# Drop the first line ("# ... resolved from <source>"), which names a different source.
# (string(REGEX REPLACE "^...") would strip every line: CMake re-anchors ^ after each match.)
function(drop_first_line text out_var)
  string(FIND "${text}" "\n" nl)
  math(EXPR start "${nl} + 1")
  string(SUBSTRING "${text}" ${start} -1 rest)
  set(${out_var} "${rest}" PARENT_SCOPE)
endfunction()
drop_first_line("${first_print}" a)
drop_first_line("${last_out}" b)
if(NOT a STREQUAL b OR a STREQUAL "")
  message("FAIL print-config round trip:\n--- first\n${a}\n--- second\n${b}")
  math(EXPR failures "${failures} + 1")
endif()

# Two ranks: both exit 2, nobody hangs, the message is printed once (by rank 0).
set(mpi ${MPIEXEC} --oversubscribe -np 2)
run_case(NAME "mpirun -np 2: bad config" EXIT 2 EXPECT_ERR "unknown key 'train.lrr'"
         ARGS ${mpi} ${ULYSSES} train --config ${bad})
string(REGEX MATCHALL "error: " hits "${last_err}${last_out}")
list(LENGTH hits n_hits)
if(NOT n_hits EQUAL 1)
  message("FAIL mpirun -np 2: 'error: ' printed ${n_hits} times, expected once")
  math(EXPR failures "${failures} + 1")
endif()
# P = 4 on 2 ranks: loads, then fails validate_for_world on every rank.
run_case(NAME "mpirun -np 2: sequence does not divide the world" EXIT 2
         EXPECT_ERR "key 'parallel.sequence' (4) must divide the world size (2 ranks): valid values for this world and model are 1, 2"
         ARGS ${mpi} ${ULYSSES} check --set parallel.sequence=4)

# A refusal inside run_train that every rank reaches alike (AllRanksUserError): exit 2, printed
# once, not once per rank with an MPI_Abort.
run_case(NAME "mpirun -np 2: train refuses parallel.emulate_sequence" EXIT 2
         EXPECT_ERR "parallel.emulate_sequence = 2: emulation measures one rank's work"
         ARGS ${mpi} ${ULYSSES} train --set parallel.emulate_sequence=2 --set runtime.device=cpu --set train.max_steps=1)
string(REGEX MATCHALL "error: " hits "${last_err}${last_out}")
list(LENGTH hits n_hits)
if(NOT n_hits EQUAL 1)
  message("FAIL mpirun -np 2 emulate_sequence in train: 'error: ' printed ${n_hits} times, expected once")
  math(EXPR failures "${failures} + 1")
endif()

# runtime.device=cuda where no GPU is visible (or in a CPU-only build): exit 2 with a message that
# names the key, printed once under mpirun; likewise parallel.backend=nccl. Not run where
# nvidia-smi lists a GPU (there these configs train; tests/cuda covers them).
execute_process(COMMAND nvidia-smi -L RESULT_VARIABLE smi_rc OUTPUT_VARIABLE smi_out ERROR_QUIET)
if(smi_rc EQUAL 0 AND smi_out MATCHES "GPU [0-9]")
  message("skip the no-GPU cases: a GPU is visible")
else()
  run_case(NAME "runtime.device=cuda without a GPU" EXIT 2 EXPECT_ERR "error: runtime.device = cuda, but"
           ARGS ${ULYSSES} train --set runtime.device=cuda --set train.max_steps=1)
  run_case(NAME "mpirun -np 2: runtime.device=cuda without a GPU" EXIT 2 EXPECT_ERR "runtime.device = cuda, but"
           ARGS ${mpi} ${ULYSSES} train --set runtime.device=cuda --set train.max_steps=1)
  string(REGEX MATCHALL "error: " hits "${last_err}${last_out}")
  list(LENGTH hits n_hits)
  if(NOT n_hits EQUAL 1)
    message("FAIL mpirun -np 2 runtime.device=cuda: 'error: ' printed ${n_hits} times, expected once")
    math(EXPR failures "${failures} + 1")
  endif()
  run_case(NAME "bench: runtime.device=cuda without a GPU" EXIT 2 EXPECT_ERR "error: runtime.device = cuda, but"
           ARGS ${ULYSSES} bench --set runtime.device=cuda --repeat 1 --warmup 0)
  run_case(NAME "parallel.backend=nccl without a GPU" EXIT 2 EXPECT_ERR "error: parallel.backend = nccl moves device memory"
           ARGS ${ULYSSES} check --set parallel.backend=nccl)
endif()

# A new user's first run: files named, no --config and no data.source. The embedded default's
# synthetic source gives way to the files (with a warning saying so), and the start-up log says
# where the tokens come from. Then the documented no-ops: warned about, not refused.
string(REPEAT "the quick brown fox jumps over the lazy dog; a stitch in time saves nine.\n" 600 corpus)
file(WRITE ${WORK_DIR}/corpus.txt "${corpus}")
run_case(NAME "prepare a corpus" EXIT 0 ARGS ${ULYSSES} prepare ${WORK_DIR}/corpus.txt --out ${WORK_DIR}/newuser
         --name corpus --val-fraction 0.1)
set(small --set model.n_layer=1 --set model.n_embd=32 --set runtime.device=cpu --set runtime.threads=1
    --set train.max_steps=2 --set train.eval_steps=1)
run_case(NAME "data.train without --config trains on the files" EXIT 0
         EXPECT_OUT "config: data.source: shards, since data.train is set (--set data.train="
         ARGS ${ULYSSES} train ${small} --set "data.train=${WORK_DIR}/newuser/corpus_train_*.bin"
         --set "data.val=${WORK_DIR}/newuser/corpus_val_*.bin")
foreach(expected "data: train: 1 shard (${WORK_DIR}/newuser/corpus_train_000000.bin), "
                 "data: val: 1 shard (${WORK_DIR}/newuser/corpus_val_000000.bin), ")
  string(FIND "${last_out}" "${expected}" pos)
  if(pos EQUAL -1)
    message("FAIL data.train without --config: the log lacks '${expected}':\n${last_out}")
    math(EXPR failures "${failures} + 1")
  endif()
endforeach()
# (no square bracket in the expected text: CMake's lists would swallow the arguments after it)
run_case(NAME "synthetic data is named in the log" EXIT 0
         EXPECT_OUT "256), no files read; the loss stays near ln(256) = 5.55"
         ARGS ${ULYSSES} train ${small})
run_case(NAME "a no-op the device decides is a warning" EXIT 0
         EXPECT_OUT "config: runtime.attention 'flash' has no effect: the job runs on the CPU (runtime.device auto)"
         ARGS ${ULYSSES} train ${small} --set runtime.device=auto --set runtime.attention=flash)
run_case(NAME "data.train under an explicit synthetic source is refused" EXIT 2
         EXPECT_ERR "key 'data.train' has no effect, because data.source is 'synthetic' (random tokens; no file is read): set data.source: shards, or drop data.train"
         ARGS ${ULYSSES} train ${small} --set data.source=synthetic --set "data.train=${WORK_DIR}/newuser/corpus_train_*.bin")

# ulysses bench --csv (on the cpu): the header ends with peak_gpu_gib (empty on cpu), every row has
# the header's column count, a second run appends under the same header, and a file with another
# header is refused before anything runs (exit 2, naming --csv).
set(csv ${WORK_DIR}/bench.csv)
set(tiny_bench ${ULYSSES} bench --set model.n_layer=1 --set model.n_embd=64 --set model.n_head=2
    --set model.vocab_size=256 --set model.max_seq_len=64 --set train.seq_len=64 --set train.micro_batch_size=1
    --set runtime.device=cpu --set runtime.threads=1 --repeat 1 --warmup 0)
run_case(NAME "bench --csv" EXIT 0 ARGS ${tiny_bench} --csv ${csv})
run_case(NAME "bench --csv appends" EXIT 0 ARGS ${tiny_bench} --csv ${csv})
file(STRINGS ${csv} csv_lines)
list(LENGTH csv_lines n_csv_lines)
list(GET csv_lines 0 csv_header)
string(REGEX MATCHALL "," header_commas "${csv_header}")
list(LENGTH header_commas n_header_commas)
set(csv_ok TRUE)
if(NOT n_csv_lines EQUAL 3 OR NOT csv_header MATCHES ",mfu,peak_gpu_gib$")
  set(csv_ok FALSE)
endif()
foreach(line IN LISTS csv_lines)
  string(REGEX MATCHALL "," commas "${line}")
  list(LENGTH commas n_commas)
  if(NOT n_commas EQUAL n_header_commas OR NOT line MATCHES "(^layers,|,cpu,,0\\.0,0\\.0000,$)")
    set(csv_ok FALSE)
  endif()
endforeach()
if(csv_ok)
  message("ok   bench --csv: header and rows")
else()
  message("FAIL bench --csv: expected a header ending in peak_gpu_gib and 2 cpu rows of as many columns:\n${csv_lines}")
  math(EXPR failures "${failures} + 1")
endif()
file(WRITE ${WORK_DIR}/old.csv "layers,width,heads\n1,64,2\n")
run_case(NAME "bench --csv with another header" EXIT 2 EXPECT_ERR "--csv '${WORK_DIR}/old.csv': the file's header"
         ARGS ${tiny_bench} --csv ${WORK_DIR}/old.csv)

if(failures GREATER 0)
  message(FATAL_ERROR "${failures} command-line case(s) failed")
endif()
