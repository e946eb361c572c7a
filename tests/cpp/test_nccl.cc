// NcclLibrary::open without NCCL on the machine: every candidate is tried in order and the
// error names each one with why it failed (the Python tests cover a stand-in libnccl).
#include <gtest/gtest.h>

#include <string>

#include "fastllm/nccl.h"

static std::string open_error(const std::vector<std::string>& candidates) {
  try {
    fastllm::NcclLibrary::open(candidates);
  } catch (const fastllm::NcclError& e) {
    return e.what();
  }
  return "";
}

TEST(NcclLibrary, NamesEveryPathTriedAndWhy) {
  const std::string msg = open_error({"/nonexistent/libnccl.so.2", "libc.so.6"});
  EXPECT_NE(msg.find("could not load NCCL"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\n  /nonexistent/libnccl.so.2: "), std::string::npos) << msg;
  EXPECT_NE(msg.find("\n  libc.so.6: does not export ncclGetVersion (not an NCCL library)"), std::string::npos)
      << msg;
  EXPECT_LT(msg.find("/nonexistent"), msg.find("libc.so.6"));  // in the order given
}

TEST(NcclLibrary, NoCandidatesIsAnError) {
  EXPECT_NE(open_error({}).find("(no candidate paths)"), std::string::npos);
}
