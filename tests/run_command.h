// SPDX-License-Identifier: Apache-2.0
// Runs a program of the build (an example) from a test: its exit status and all it printed.
// Torch-free, so tests of whole programs stay light to compile.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace prefopt_test {

struct CommandResult {
  int status = -1;     // the exit status; -1 when killed by a signal
  std::string output;  // stdout and stderr, interleaved
};

/// `program args 2>&1` through the shell; waits for it to end.
inline CommandResult run_command(const std::string& program, const std::string& args) {
  const std::string cmd = program + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  CommandResult r;
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int rc = ::pclose(p);
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return r;
}

}  // namespace prefopt_test
