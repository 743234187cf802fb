// bind_util.h — argument parsing shared by the binding files (quant type names, group sizes,
// float32 arrays).
// Errors are ValueError("[op] expected X, got Y") via ev::fail.
#pragma once

#include <pybind11/numpy.h>

#include <optional>
#include <string>

#include "../common.h"
#include "../kernels/kernels.h"
#include "../qtypes/qtype.h"

namespace ev_bind {

namespace py = pybind11;
using ev::fail;

// "[d0, d1, ...]" for error messages
inline std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// The data of a float32 C-contiguous array (any shape); ValueError otherwise.
inline float* f32_data(const char* op, const char* name, const py::array& a) {
  if (!a.dtype().is(py::dtype::of<float>()))
    fail(op, "expected ", name, ".dtype float32, got ", py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style)) fail(op, "expected ", name, " to be C-contiguous (use np.ascontiguousarray)");
  return static_cast<float*>(const_cast<void*>(a.data()));
}

inline ev::QType parse_qtype(const char* op, const std::string& s) {
  for (int i = 0; i < ev::kNumQTypes; ++i)
    if (s == ev::qtype_name((ev::QType)i)) return (ev::QType)i;
  fail(op, "expected qtype one of q2|q3|q4|q8|q2b, got '", s, "'");
}

inline ev::Isa resolve_isa(const char* op, const std::optional<std::string>& s) {
  if (!s) return ev::default_isa();
  ev::Isa isa;
  if (!ev::parse_isa(s->c_str(), &isa)) fail(op, "expected isa one of ", ev::isa_names(), ", got '", *s, "'");
  if (!ev::isa_supported(isa))
    fail(op, "isa '", *s, "' is ", ev::isa_compiled(isa) ? "not supported by this CPU" : "not compiled into this build");
  return isa;
}

inline void check_group(const char* op, int group, int64_t k) {
  if (!ev::valid_group(group)) fail(op, "expected group size 32, 64 or 128, got ", group);
  if (k <= 0 || k % group != 0) fail(op, "expected K to be a positive multiple of the group size ", group, ", got K=", k);
}

// Per qtype: q2b has the fixed group 16 (its level-1 group) and needs K % 32 == 0 (the q2
// code stream is built from 32-code granules).
inline void check_group(const char* op, ev::QType t, int group, int64_t k) {
  if (t != ev::QType::Q2B) return check_group(op, group, k);
  if (group != ev::kQ2BGroup) fail(op, "expected group size 16 for q2b (fixed by the type), got ", group);
  if (k <= 0 || k % ev::kGranule != 0) fail(op, "expected K to be a positive multiple of 32 for q2b, got K=", k);
}

}  // namespace ev_bind
