cmake_minimum_required(VERSION 3.25)
# cmake -DROOT=<repository> -P layering.cmake: checks the include rule of the layers (see
# CMakeLists.txt here). A file in folder F may include "X/..." only when X is F itself or a layer
# below F. Exits non-zero with one line per violation.
#   layer        may include
#   core/base    core/base
#   kernels      kernels, core/base
#   comm         comm, kernels, core/base
#   core         core, comm, kernels, core/base
#   apps         everything
if(NOT ROOT)
  message(FATAL_ERROR "layering.cmake: pass -DROOT=<repository root>")
endif()
set(allowed_core_base "core/base")
set(allowed_kernels "kernels;core/base")
set(allowed_comm "comm;kernels;core/base")
set(allowed_core "core;comm;kernels;core/base")

# the layer of an include target "a/b/c.h": core/base when it starts so, else its first folder
function(layer_of path out)
  if(path MATCHES "^core/base/")
    set(${out} "core/base" PARENT_SCOPE)
  elseif(path MATCHES "^([a-z_]+)/")
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

set(violations 0)
set(checked 0)
foreach(layer core/base kernels comm core)
  string(REPLACE "/" "_" key "${layer}")
  if(layer STREQUAL "core")
    file(GLOB files ${ROOT}/core/*.h ${ROOT}/core/*.cpp)
  else()
    file(GLOB_RECURSE files ${ROOT}/${layer}/*.h ${ROOT}/${layer}/*.cpp ${ROOT}/${layer}/*.cu ${ROOT}/${layer}/*.cuh)
  endif()
  foreach(f IN LISTS files)
    math(EXPR checked "${checked} + 1")
    file(STRINGS ${f} lines REGEX "^[ \t]*#[ \t]*include[ \t]+\"")
    foreach(line IN LISTS lines)
      string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]+\"([^\"]+)\".*" "\\1" target "${line}")
      layer_of("${target}" target_layer)
      if(target_layer STREQUAL "" OR NOT target_layer MATCHES "^(core/base|core|comm|kernels|apps|tests|fuzz)$")
        continue()  # a file beside this one, or a third-party header
      endif()
      if(NOT target_layer IN_LIST allowed_${key})
        file(RELATIVE_PATH rel ${ROOT} ${f})
        message("${rel}: #include \"${target}\": the ${layer} layer may include only from: ${allowed_${key}}")
        math(EXPR violations "${violations} + 1")
      endif()
    endforeach()
  endforeach()
endforeach()
if(violations GREATER 0)
  message(FATAL_ERROR "layering: ${violations} include(s) against the layer order (docs/design.md)")
endif()
message("layering: ${checked} files follow apps -> core -> comm -> kernels -> core/base")
