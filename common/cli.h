// The command lines of the three programs: CLI11 (Debian's libcli11-dev) with aviary's
// conventions, so that every program and subcommand answers -h/--help from the same option
// definitions it parses with, and a bad command line ends the same way everywhere:
//
//   PROGRAM CMD: MESSAGE (PROGRAM CMD --help lists the flags)      on stderr, exit code 2
//
// where MESSAGE is CLI11's ("--config is required", "The following argument was not expected:
// --stge", to which we add the command's nearest flag: " (did you mean --stage?)") or ours for
// numbers ("--fold: expected an integer in [0, 99], got 'x'").
#ifndef AVIARY_COMMON_CLI_H_
#define AVIARY_COMMON_CLI_H_

#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"

namespace aviary::common {

// What a parsed subcommand runs: set by its CLI11 callback, called by main(); returns the exit
// code.
using CommandRunner = std::function<int()>;

// A program's top-level app with our help layout; subcommands added to it inherit the layout.
void ConfigureApp(CLI::App* app);

// A subcommand of `parent`: `summary` is its line in the parent's help, `details` (wrapped) follow
// its flags in its own help.
CLI::App* AddCommand(CLI::App* parent, const std::string& name, const std::string& summary,
                     const std::string& details = "");

// `text` with its words wrapped at `width` columns; existing line breaks are kept.
std::string WrapText(const std::string& text, size_t width = 96);

// A bash completion script for the program of `app` (its name is the command completed): the
// subcommands and flags at each point of a command line, files elsewhere. Commands that pass
// their arguments on (prefix commands: `aviary mel`) have their flags read from their --help
// when completed.
std::string BashCompletion(const CLI::App& app);

// Parses `args` (the program's arguments without argv[0]). std::nullopt: the command line is
// good, run it. Otherwise the exit code to return at once: 0 after printing the help of the
// deepest command named (for -h/--help), 2 after printing the error as above (only when
// `print_errors`: the ranks of an mpirun world other than 0 keep quiet).
std::optional<int> ParseCommandLine(CLI::App* app, const std::vector<std::string>& args,
                                    bool print_errors = true);

// "aviary dataset folds" for the app of `dataset folds` under `aviary`.
std::string CommandPath(const CLI::App* app);

// The subcommand of `app` that was given on the command line, nullptr when none.
CLI::App* SelectedSubcommand(const CLI::App* app);

// `--set key=value` (repeatable): dotted config overrides, checked for the '='.
CLI::Option* AddSetOption(CLI::App* app, std::vector<std::string>* overrides,
                          const std::string& description = "override a config key (repeatable)");

// A value flag that may repeat (`--checkpoint A --checkpoint B`), one value per occurrence.
CLI::Option* AddRepeatedOption(CLI::App* app, const std::string& name, std::vector<std::string>* values,
                               const std::string& type_name, const std::string& description);

// Validators for numbers with a message that names the flag, the range and the text given:
// "--fold: expected an integer in [0, 99], got 'x'". IntegerIn rewrites the text in base 10
// (use it with Option::transform: a check() runs on a copy).
CLI::Validator IntegerIn(long long min, long long max);
// "--out: expected a path, got ''": for a path or name flag whose empty value would be
// skipped ("--plot $UNSET"), widened (--task) or taken as the current or root folder.
CLI::Validator NonEmpty(const std::string& what);
// "--stage: expected one of pretrain, finetune, got 'x'".
CLI::Validator OneOf(std::vector<std::string> choices);
CLI::Validator NumberIn(double min, double max);

// A coordinator address to dial: HOST:PORT with a port of digits in 1..65535, or a unix: /
// unix-abstract: address. INVALID_ARGUMENT naming `source` (the flag or variable) and the
// address otherwise: without a port gRPC dials 443, and it reads "host:99999" or "host:" as
// another port, failing as "Connection refused" on an address nobody typed.
absl::Status CheckDialAddress(const std::string& address, const std::string& source);

// A numeric option in [min, max], stored in *out (its initial value is the default).
template <typename T>
CLI::Option* AddNumber(CLI::App* app, const std::string& name, T* out, const std::string& type_name,
                       const std::string& description, T min = std::numeric_limits<T>::lowest(),
                       T max = std::numeric_limits<T>::max()) {
  CLI::Option* option = app->add_option(name, *out, description)->type_name(type_name);
  if constexpr (std::is_integral_v<T>) {
    // A transform: the text is handed on in base 10 (IntegerIn).
    option->transform(IntegerIn(static_cast<long long>(min), static_cast<long long>(max)));
  } else {
    option->check(NumberIn(static_cast<double>(min), static_cast<double>(max)));
  }
  return option;
}

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CLI_H_
