// Argument errors raised by the core; the bindings map them to Python's TypeError and
// ValueError so a user sees which argument was wrong and what was expected.
#pragma once
#include <stdexcept>
#include <string>

namespace fastllm {

struct ArgTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ArgValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace fastllm
