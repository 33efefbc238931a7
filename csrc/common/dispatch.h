// Host-side dtype dispatch: turns the integer dtype code passed from Python into a C++ type.
#pragma once

#include <stdexcept>
#include <string>

#include "common/macros.h"

namespace colabx {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the floating dtypes the ops accept (fp32, fp16, bf16, fp64).
template <typename Fn>
void dispatch_floating(int code, const char* what, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return fn(TypeTag<float>{});
    case DType::Float16: return fn(TypeTag<half_t>{});
    case DType::BFloat16: return fn(TypeTag<bfloat16_t>{});
    case DType::Float64: return fn(TypeTag<double>{});
    default: throw std::invalid_argument(std::string(what) + ": unsupported floating dtype code " +
                                         std::to_string(code));
  }
}

// Calls fn(TypeTag<T>{}) for the integer label dtypes (uint8, int32, int64).
template <typename Fn>
void dispatch_labels(int code, const char* what, Fn&& fn) {
  switch (static_cast<DType>(code)) {
    case DType::UInt8:
    case DType::Bool: return fn(TypeTag<uint8_t>{});
    case DType::Int32: return fn(TypeTag<int32_t>{});
    case DType::Int64: return fn(TypeTag<int64_t>{});
    default: throw std::invalid_argument(std::string(what) + ": unsupported label dtype code " +
                                         std::to_string(code));
  }
}

}  // namespace colabx
