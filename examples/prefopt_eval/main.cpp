// SPDX-License-Identifier: Apache-2.0
// prefopt-eval: evaluates prefopt's losses on JSON requests, in float64, so that anyone can
// check them against their Python trainer with the same numbers.
//
//   echo '{"loss": "sigmoid", "params": {"beta": 0.1}, "inputs": {...}}' | prefopt-eval
//   prefopt-eval requests.json
#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "request.h"

int main(int argc, char** argv) {
  CLI::App app{
      "Evaluates prefopt's preference losses on JSON requests, in float64.\n"
      "A request is {\"loss\": L, \"params\": {...}, \"inputs\": {...}}, or an array of them;\n"
      "the answer is {\"loss\", \"losses\", \"chosen_rewards\", \"rejected_rewards\", "
      "\"metrics\"}\n"
      "per request, or {\"error\": ...} (then the exit status is 2). See the README."};
  std::string path = "-";
  int indent = -1;
  app.add_option("file", path, "Request file; - or nothing reads standard input");
  // Bounded: nlohmann-json reads past its indent buffer for indents of 1026 and more.
  app.add_option("--indent", indent, "Pretty-print the JSON with this indent (default: one line)")
      ->check(CLI::Range(0, 16));
  CLI11_PARSE(app, argc, argv);

  std::ostringstream text;
  prefopt_eval::Reply reply;
  if (path == "-") {
    text << std::cin.rdbuf();
    reply = prefopt_eval::handle(text.str(), indent);
  } else if (std::ifstream f(path); f) {
    text << f.rdbuf();
    reply = prefopt_eval::handle(text.str(), indent);
  } else {
    reply = prefopt_eval::error_reply("cannot read " + path);
  }
  std::cerr << reply.err;
  std::cout << reply.out;
  return reply.status;
}
