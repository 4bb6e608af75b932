// Errors raised by qmoe. Every error names what it is about (file, tensor) in its message.
#pragma once

#include <stdexcept>
#include <string>

namespace qmoe {

// Base of every exception qmoe throws. Bad arguments to an API call are `InvalidArgument`,
// malformed or inconsistent files are `FormatError`.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file (container, checkpoint, Hessian file, token file) that is unreadable, truncated or
// inconsistent. The message starts with the file path and, where known, the tensor name.
class FormatError : public Error {
 public:
  using Error::Error;
};

// Builds "file: tensor 'name': what" (parts that are empty are left out).
std::string error_context(const std::string& file, const std::string& tensor,
                          const std::string& what);

}  // namespace qmoe
