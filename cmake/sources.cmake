# The C++ sources of the kernel library and their per-file ISA flags, shared by the Python
# extension and the standalone C++ test (tests/cpp/kernel_test.cc).
set(EDGEVLM_SOURCES
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu_features.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/threadpool.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/membench.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/dispatch.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/linear.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/ref/linear_ref.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/encode_ops.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/decode_ops.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/decode_step.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/qtta_ops.cc)
set(EDGEVLM_DEFINES "")

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  option(EDGEVLM_AVX2 "Compile the AVX2+FMA kernels" ON)
  file(GLOB _avx2 ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/avx2/*.cc)
  if(EDGEVLM_AVX2 AND _avx2)
    set_source_files_properties(${_avx2} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
    list(APPEND EDGEVLM_SOURCES ${_avx2})
    list(APPEND EDGEVLM_DEFINES EDGEVLM_HAVE_AVX2=1)
    # The encoder glue's AVX2+FMA build (csrc/ops/encode_impl.h; dispatched by encode_ops.cc).
    set(_encode_avx2 ${CMAKE_CURRENT_SOURCE_DIR}/csrc/ops/encode_ops_avx2.cc)
    set_source_files_properties(${_encode_avx2} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
    list(APPEND EDGEVLM_SOURCES ${_encode_avx2})
    # AVX-VNNI (VEX vpdpbusd): the AVX2 kernels rebuilt with EV_VNNI (avxvnni/*.cc include
    # avx2/*_impl.h), only when the compiler knows -mavxvnni (GCC >= 11, Clang >= 12).
    # Their inline/template code lives in namespace ev::avxvnni (distinct symbols); shared
    # inline helpers (qtypes/*.h) are linked after the baseline and avx2 copies.
    option(EDGEVLM_AVXVNNI "Compile the AVX-VNNI kernels (needs EDGEVLM_AVX2)" ON)
    include(CheckCXXCompilerFlag)
    check_cxx_compiler_flag("-mavxvnni" EDGEVLM_CXX_HAS_MAVXVNNI)
    file(GLOB _avxvnni ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/avxvnni/*.cc)
    if(EDGEVLM_AVXVNNI AND EDGEVLM_CXX_HAS_MAVXVNNI AND _avxvnni)
      set_source_files_properties(${_avxvnni} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c;-mavxvnni")
      list(APPEND EDGEVLM_SOURCES ${_avxvnni})
      list(APPEND EDGEVLM_DEFINES EDGEVLM_HAVE_AVXVNNI=1)
    endif()
    # AVX-512 VNNI (EVEX vpdpbusd on zmm): the q2/q3/q4/q8 GEMM of csrc/kernels/avx512vnni,
    # only when the compiler knows -mavx512vnni (GCC >= 8, Clang >= 6). Its inline/template
    # code lives in namespace ev::avx512vnni (common_avx2.h: EV_AVX512VNNI).
    option(EDGEVLM_AVX512VNNI "Compile the AVX-512 VNNI kernels (needs EDGEVLM_AVX2)" ON)
    check_cxx_compiler_flag("-mavx512vnni" EDGEVLM_CXX_HAS_MAVX512VNNI)
    file(GLOB _avx512vnni ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/avx512vnni/*.cc)
    if(EDGEVLM_AVX512VNNI AND EDGEVLM_CXX_HAS_MAVX512VNNI AND _avx512vnni)
      set_source_files_properties(${_avx512vnni} PROPERTIES COMPILE_OPTIONS
        "-mavx2;-mfma;-mf16c;-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni")
      list(APPEND EDGEVLM_SOURCES ${_avx512vnni})
      list(APPEND EDGEVLM_DEFINES EDGEVLM_HAVE_AVX512VNNI=1)
    endif()
  endif()
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "aarch64|arm64|ARM64")
  file(GLOB _neon ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/neon/*.cc)
  file(GLOB _neondot ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/neondot/*.cc)
  if(_neon AND _neondot)
  set_source_files_properties(${_neondot} PROPERTIES COMPILE_OPTIONS "-march=armv8.2-a+dotprod")
  list(APPEND EDGEVLM_SOURCES ${_neon} ${_neondot})
  list(APPEND EDGEVLM_DEFINES EDGEVLM_HAVE_NEON=1)
  endif()
endif()

function(edgevlm_configure_target tgt)
  target_compile_definitions(${tgt} PRIVATE ${EDGEVLM_DEFINES})
  target_compile_options(${tgt} PRIVATE -Wall -Wextra -O3)
  if(EDGEVLM_NATIVE)
    target_compile_options(${tgt} PRIVATE -march=native)
  endif()
endfunction()
