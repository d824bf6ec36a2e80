// SPDX-License-Identifier: Apache-2.0
// prefopt-eval: evaluates prefopt's losses on JSON requests, in float64, so that anyone can
// check them against their Python trainer with the same numbers.
//
//   echo '{"loss": "sigmoid", "params": {"beta": 0.1}, "inputs": {...}}' | prefopt-eval
//   prefopt-eval requests.json
#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "request.h"

int main(int argc, char** argv) {
  CLI::App app{
      "Evaluates prefopt's preference losses on JSON requests, in float64.\n"
      "A request is {\"loss\": L, \"params\": {...}, \"inputs\": {...}} (answered with\n"
      "{\"loss\", \"losses\", \"chosen_rewards\", \"rejected_rewards\", \"metrics\"}), a metrics\n"
      "request {\"metrics\": {...}, \"steps\": [...]} (a logging window of such requests, one\n"
      "per micro-step and rank; answered with the reduced metrics under both windows), or an\n"
      "array of them. A request that fails is answered with {\"error\": ...}, and the exit\n"
      "status is then 2, as it is for a bad command line. See the README."};
  std::string path = "-";
  int indent = -1;
  app.add_option("file", path, "Request file; - or nothing reads standard input");
  // Bounded: nlohmann-json reads past its indent buffer for indents of 1026 and more.
  app.add_option("--indent", indent, "Pretty-print the JSON with this indent (default: one line)")
      ->check(CLI::Range(0, 16));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11's codes (105 for --indent 17, 109 for an unknown option, ...) would make a bad
    // command line exit unlike every other error here (2); --help is a ParseError with code 0.
    return app.exit(e) == 0 ? 0 : 2;
  }

  std::ostringstream text;
  prefopt_eval::Reply reply;
  errno = 0;
  if (path == "-") {
    text << std::cin.rdbuf();
    reply = prefopt_eval::handle(text.str(), indent);
  } else if (std::error_code ec; std::filesystem::is_directory(path, ec)) {
    // A directory opens as a stream that reads nothing, which would pass as empty JSON.
    reply = prefopt_eval::error_reply("cannot read " + path + ": it is a directory");
  } else if (std::ifstream f(path); f) {
    text << f.rdbuf();
    reply = prefopt_eval::handle(text.str(), indent);
  } else {
    reply = prefopt_eval::error_reply("cannot read " + path + ": " +
                                      (errno != 0 ? std::strerror(errno) : "cannot open it"));
  }
  std::cerr << reply.err;
  std::cout << reply.out;
  return reply.status;
}
