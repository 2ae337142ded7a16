#include "common/cli.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/config.h"

namespace aviary::common {

namespace {

// CLI11's layout, with the whole command path in the usage line ("Usage: aviary dataset folds
// [OPTIONS]"; CLI11 2.1 writes only the last name).
class Formatter : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* app, std::string /*name*/) const override {
    return CLI::Formatter::make_usage(app, CommandPath(app));
  }
};

}  // namespace

void ConfigureApp(CLI::App* app) {
  auto formatter = std::make_shared<Formatter>();
  formatter->column_width(36);
  formatter->label("REQUIRED", "(required)");
  app->formatter(formatter);
  app->description(WrapText(app->get_description()));
  // One style for every program: --name value or --name=value, no /windows flags.
  app->allow_windows_style_options(false);
}

CLI::App* AddCommand(CLI::App* parent, const std::string& name, const std::string& summary,
                     const std::string& details) {
  CLI::App* sub = parent->add_subcommand(name, summary);
  sub->footer(details.empty() ? "" : WrapText(details) + "\n");
  return sub;
}

std::string WrapText(const std::string& text, size_t width) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!out.empty()) out += '\n';
    size_t column = 0;
    for (absl::string_view word : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
      if (column > 0 && column + 1 + word.size() > width) {
        out += '\n';
        column = 0;
      } else if (column > 0) {
        out += ' ';
        ++column;
      }
      absl::StrAppend(&out, word);
      column += word.size();
    }
  }
  return out;
}

namespace {

// One case of the completion's `case "$path"`: the flags and subcommands of `app`, whose path
// below the program is `path` (" dataset folds"), and of its subcommands, recursively.
void AddCompletionCases(const CLI::App& app, const std::string& path, std::string* known_paths,
                        std::string* cases) {
  std::vector<std::string> flags;
  for (const CLI::Option* option : app.get_options()) {
    if (!option->nonpositional()) continue;
    for (const std::string& s : option->get_snames()) flags.push_back("-" + s);
    for (const std::string& l : option->get_lnames()) flags.push_back("--" + l);
  }
  std::vector<std::string> subs;
  for (const CLI::App* sub : app.get_subcommands({})) subs.push_back(sub->get_name());
  if (app.get_prefix_command()) {
    absl::StrAppend(cases, "    \"", path, "\") flags=$(\"${COMP_WORDS[0]}\"", path,
                    " --help 2>/dev/null | grep -oE -- '--[a-z][a-z0-9-]*' | sort -u) ;;\n");
  } else {
    absl::StrAppend(cases, "    \"", path, "\") subs=\"", absl::StrJoin(subs, " "), "\"; flags=\"",
                    absl::StrJoin(flags, " "), "\" ;;\n");
  }
  for (const CLI::App* sub : app.get_subcommands({})) {
    const std::string sub_path = absl::StrCat(path, " ", sub->get_name());
    absl::StrAppend(known_paths, known_paths->empty() ? "" : "|", "\"", sub_path, "\"");
    AddCompletionCases(*sub, sub_path, known_paths, cases);
  }
}

}  // namespace

std::string BashCompletion(const CLI::App& app) {
  const std::string name = app.get_name();
  std::string function = "_" + name;
  for (char& c : function) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  std::string known_paths, cases;
  AddCompletionCases(app, "", &known_paths, &cases);
  return absl::StrCat(
      "# bash completion for ", name, " (", name, " completion bash)\n",
      function, "() {\n",
      "  local cur=${COMP_WORDS[COMP_CWORD]} path= subs= flags= i\n",
      "  for ((i = 1; i < COMP_CWORD; i++)); do\n",
      "    case \"$path ${COMP_WORDS[i]}\" in\n",
      "      ", known_paths.empty() ? "\"\"" : known_paths, ") path=\"$path ${COMP_WORDS[i]}\" ;;\n",
      "    esac\n",
      "  done\n",
      "  case \"$path\" in\n", cases, "  esac\n",
      "  if [[ $cur == -* ]]; then\n",
      "    COMPREPLY=($(compgen -W \"$flags\" -- \"$cur\"))\n",
      "  elif [[ -n $subs ]]; then\n",
      "    COMPREPLY=($(compgen -W \"$subs\" -- \"$cur\"))\n",
      "  else\n",
      "    COMPREPLY=($(compgen -f -- \"$cur\"))\n",
      "  fi\n",
      "}\n",
      "complete -o filenames -F ", function, " ", name, "\n");
}

std::string CommandPath(const CLI::App* app) {
  std::string path = app->get_name();
  for (const CLI::App* p = app->get_parent(); p != nullptr; p = p->get_parent()) {
    path = absl::StrCat(p->get_name(), " ", path);
  }
  return path;
}

CLI::App* SelectedSubcommand(const CLI::App* app) {
  std::vector<CLI::App*> selected = app->get_subcommands();
  return selected.empty() ? nullptr : selected.front();
}

namespace {

// The command the user was in when parsing stopped: the last subcommand selected, recursively.
const CLI::App* DeepestSelected(const CLI::App* app) {
  for (const CLI::App* sub = SelectedSubcommand(app); sub != nullptr; sub = SelectedSubcommand(sub)) {
    app = sub;
  }
  return app;
}

// The first "--name" of `args` that neither `command` nor its parents define, "" when none.
std::string FirstUnknownFlag(const CLI::App* command, const std::vector<std::string>& args) {
  for (const std::string& arg : args) {
    if (arg == "--") break;
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) continue;
    const std::string name = arg.substr(0, arg.find('='));
    bool known = false;
    for (const CLI::App* a = command; a != nullptr && !known; a = a->get_parent()) {
      known = a->get_option_no_throw(name) != nullptr;
    }
    if (!known) return name;
  }
  return "";
}

// A value flag of `command` (or a parent) followed by another of its flags ("--out --format",
// the value left out: a script's unset variable): CLI11 takes that flag as the value, and
// `aviary export ck.pt --out --format` wrote a file named "--format". The message, "" when none.
std::string FlagTakenAsValue(const CLI::App* command, const std::vector<std::string>& args) {
  auto find = [command](const std::string& name) -> const CLI::Option* {
    for (const CLI::App* a = command; a != nullptr; a = a->get_parent()) {
      if (const CLI::Option* option = a->get_option_no_throw(name); option != nullptr) return option;
    }
    return nullptr;
  };
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--") break;
    if (args[i].size() < 3 || args[i].compare(0, 2, "--") != 0) continue;
    const size_t eq = args[i].find('=');
    // "--out=" (an unset variable after the '='): CLI11 takes it as "--out" and the next
    // argument as its value, "--set=seed=7" a file name and the override lost.
    const bool empty_value = eq != std::string::npos && eq + 1 == args[i].size();
    if (eq != std::string::npos && !empty_value) continue;
    const CLI::Option* option = find(args[i].substr(0, eq));
    // Unknown, or an on/off flag (CLI11 gives a flag expected 0 values but a type size of 1).
    if (option == nullptr || option->get_expected_min() == 0 || option->get_items_expected_min() == 0) continue;
    if (empty_value) return absl::StrCat(args[i], ": expected a value after the '='");
    if (i + 1 == args.size()) continue;
    const std::string& next = args[i + 1];
    if (next == "--" || next == "-h") return absl::StrCat(args[i], ": expected a value, got '", next, "'");
    if (next.size() < 2 || next[0] != '-') continue;
    const std::string name = next.substr(0, next.find('='));
    if (find(name) != nullptr || name == "--help") {
      return absl::StrCat(args[i], ": expected a value, got the flag '", next, "'");
    }
  }
  return "";
}

// The flag of `command` nearest to the unknown "--name" `unknown` ("--tags" -> "--tag"): the
// closest one within an edit distance of 2 (the first of equally close ones), else the first
// that `unknown` begins or that begins with `unknown` ("--with-run" -> "--with-run-folders");
// "" when none is close.
std::string NearestFlag(const CLI::App* command, const std::string& unknown) {
  constexpr size_t kMaxDistance = 2;
  std::string nearest, prefixed;
  size_t nearest_distance = kMaxDistance + 1;
  for (const CLI::Option* option : command->get_options()) {
    if (!option->nonpositional()) continue;
    for (const std::string& l : option->get_lnames()) {
      const std::string flag = "--" + l;
      if (const size_t distance = EditDistance(unknown, flag); distance < nearest_distance) {
        nearest_distance = distance;
        nearest = flag;
      }
      if (prefixed.empty() && (absl::StartsWith(flag, unknown) || absl::StartsWith(unknown, flag))) {
        prefixed = flag;
      }
    }
  }
  return nearest.empty() ? prefixed : nearest;
}

// The first "--name" after `command`'s name in `args` that `command` does not define but one of
// its parents does (a program's flag given after the command: "aviary list --coordinator X"),
// "" when none.
std::string FirstParentFlagAfterCommand(const CLI::App* command, const std::vector<std::string>& args) {
  std::vector<std::string> path;  // the command words, outermost first
  for (const CLI::App* a = command; a != nullptr && a->get_parent() != nullptr; a = a->get_parent()) {
    path.insert(path.begin(), a->get_name());
  }
  if (path.empty()) return "";
  size_t i = 0;
  for (size_t matched = 0; i < args.size() && matched < path.size(); ++i) {
    if (args[i] == path[matched]) ++matched;
  }
  for (; i < args.size(); ++i) {
    if (args[i] == "--") break;
    if (args[i].size() < 3 || args[i].compare(0, 2, "--") != 0) continue;
    const std::string name = args[i].substr(0, args[i].find('='));
    if (command->get_option_no_throw(name) != nullptr) continue;
    for (const CLI::App* a = command->get_parent(); a != nullptr; a = a->get_parent()) {
      if (a->get_option_no_throw(name) != nullptr) return name;
    }
  }
  return "";
}

// " in [0, 99]", " >= 1", or "" when unbounded.
template <typename T>
std::string RangeText(T min, T max) {
  const bool low = min != std::numeric_limits<T>::lowest();
  const bool high = max != std::numeric_limits<T>::max();
  if (low && high) return absl::StrCat(" in [", min, ", ", max, "]");
  if (low) return absl::StrCat(" >= ", min);
  if (high) return absl::StrCat(" <= ", max);
  return "";
}

}  // namespace

// How CLI11 words a flag given more often than it may be (ArgumentMismatch::AtMost).
constexpr char kAtMostOne[] = ": At Most 1 required but received ";

std::optional<int> ParseCommandLine(CLI::App* app, const std::vector<std::string>& args, bool print_errors) {
  // CLI11 consumes a vector from its back.
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app->parse(reversed);
    if (const CLI::App* command = DeepestSelected(app); !FlagTakenAsValue(command, args).empty()) {
      if (print_errors) {
        std::cerr << CommandPath(command) << ": " << FlagTakenAsValue(command, args) << " (see "
                  << CommandPath(command) << " --help)\n";
      }
      return 2;
    }
    return std::nullopt;
  } catch (const CLI::CallForHelp&) {
    std::cout << DeepestSelected(app)->help();
    return 0;
  } catch (const CLI::ParseError& e) {
    if (!print_errors) return 2;
    const CLI::App* command = DeepestSelected(app);
    const std::string path = CommandPath(command);
    std::string help_path = path;
    std::string message = e.what();
    // CLI11 reports unknown flags last, after missing and invalid ones; a misspelt flag
    // ("--coordinatr" making --coordinator missing) is the more useful thing to say.
    if (std::string taken = FlagTakenAsValue(command, args); !taken.empty()) {
      // Said first: what CLI11 says then ("--audio is required") follows from it.
      message = taken;
    } else if (std::string unknown = FirstUnknownFlag(command, args); !unknown.empty()) {
      message = absl::StrCat("The following argument was not expected: ", unknown);
      if (const std::string nearest = NearestFlag(command, unknown); !nearest.empty()) {
        absl::StrAppend(&message, " (did you mean ", nearest, "?)");
      }
    } else if (const size_t at = message.find(kAtMostOne);
               dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr && at != std::string::npos) {
      // CLI11: "--limit: At Most 1 required but received 2". A program's own flag (aviary
      // --timeout) is explained by that program's help.
      const std::string flag = message.substr(0, at);
      message = absl::StrCat(flag, " was given ", message.substr(at + sizeof(kAtMostOne) - 1),
                             " times; it takes one value");
      const CLI::App* owner = command;
      while (owner->get_parent() != nullptr && owner->get_option_no_throw(flag) == nullptr) owner = owner->get_parent();
      help_path = CommandPath(owner);
    } else if (std::string misplaced = FirstParentFlagAfterCommand(command, args);
               !misplaced.empty() && dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr) {
      // The usage puts a program's own flags before the command; CLI11 only lists the extras.
      const CLI::App* owner = command->get_parent();
      while (owner->get_option_no_throw(misplaced) == nullptr) owner = owner->get_parent();
      const std::string owner_path = CommandPath(owner);
      const std::string below = CommandPath(command).substr(owner_path.size() + 1);  // "dataset folds"
      message = absl::StrCat(misplaced, " is a flag of '", owner_path, "', not of '", below, "' (the flags of '",
                             owner_path, "' go before the command: ", owner_path, " ", misplaced, " ... ", below,
                             " ...)");
    } else if (!command->get_subcommands({}).empty()) {
      // A word where a command was expected, or none.
      std::vector<std::string> names;
      for (const CLI::App* sub : command->get_subcommands({})) names.push_back(sub->get_name());
      std::vector<std::string> left = command->remaining();
      if (!left.empty() && left.front().compare(0, 1, "-") != 0) {
        message = absl::StrCat("unknown command '", left.front(), "' (expected ", absl::StrJoin(names, ", "), ")");
      } else if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr && SelectedSubcommand(command) == nullptr) {
        message = absl::StrCat("missing command (expected ", absl::StrJoin(names, ", "), ")");
      }
    }
    std::cerr << path << ": " << message << " (see " << help_path << " --help)\n";
    return 2;
  }
}

absl::Status CheckDialAddress(const std::string& address, const std::string& source) {
  if (address.empty()) return absl::InvalidArgumentError(absl::StrCat(source, " is empty (expected HOST:PORT)"));
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) return absl::OkStatus();
  if (address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected HOST:PORT, got '", address, "' (e.g. ", address, ":7070)"));
  }
  // An IPv6 address is bracketed before its port ("[::1]:7070"): in "::1" or "fe80::1" the
  // last group read as the port, and gRPC dialled an address nobody typed.
  const size_t colon = address.rfind(':');
  // gRPC's own target schemes ("dns:///coord:7070", "ipv4:10.0.0.1:7070", "ipv6:[::1]:7070")
  // carry colons of their own: their port is still the last part.
  const bool scheme = absl::StartsWith(address, "dns:") || absl::StartsWith(address, "ipv4:") ||
                      absl::StartsWith(address, "ipv6:") || absl::StartsWith(address, "xds:");
  if (!scheme && address[0] != '[' && address.find(':') != colon) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": expected HOST:PORT, got '", address,
                                                   "' (an IPv6 address goes in brackets: [", address, "]:7070)"));
  }
  if (address[0] == '[' && (colon == 0 || address[colon - 1] != ']')) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected [IPV6]:PORT, got '", address, "' (e.g. [::1]:7070)"));
  }
  const std::string port = address.substr(colon + 1);
  int number = 0;
  const bool numeric = !port.empty() && port.find_first_not_of("0123456789") == std::string::npos;
  if (!numeric || !absl::SimpleAtoi(port, &number) || number < 1 || number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected HOST:PORT with a port in 1..65535, got '", address, "'"));
  }
  return absl::OkStatus();
}

CLI::Option* AddSetOption(CLI::App* app, std::vector<std::string>* overrides, const std::string& description) {
  return AddRepeatedOption(app, "--set", overrides, "KEY=VALUE", description)
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            if (text.find('=') == std::string::npos || text.front() == '=') {
              return absl::StrCat("expected dotted.key=value, got '", text, "'");
            }
            return "";
          },
          "", "key=value"));
}

CLI::Option* AddRepeatedOption(CLI::App* app, const std::string& name, std::vector<std::string>* values,
                               const std::string& type_name, const std::string& description) {
  return app->add_option(name, *values, description)
      ->type_name(type_name)
      ->expected(1)
      ->allow_extra_args(false)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
}

CLI::Validator IntegerIn(long long min, long long max) {
  return CLI::Validator(
      [min, max](std::string& text) -> std::string {
        errno = 0;
        char* end = nullptr;
        long long v = std::strtoll(text.c_str(), &end, 10);
        if (text.empty() || end != text.c_str() + text.size() || errno == ERANGE || v < min || v > max) {
          return absl::StrCat("expected an integer", RangeText(min, max), ", got '", text, "'");
        }
        // Handed on in base 10: CLI11 converts the text again with strtoll base 0, where a
        // leading zero means octal (`--seed 0042` was seed 34, `--fold 09` refused).
        text = std::to_string(v);
        return "";
      },
      "", "integer");
}

CLI::Validator NonEmpty(const std::string& what) {
  return CLI::Validator(
      [what](std::string& text) -> std::string {
        return text.empty() ? absl::StrCat("expected ", what, ", got '' (an unset shell variable?)") : "";
      },
      "", "non-empty");
}

CLI::Validator OneOf(std::vector<std::string> choices) {
  return CLI::Validator(
      [choices](std::string& text) -> std::string {
        for (const std::string& c : choices) {
          if (text == c) return "";
        }
        return absl::StrCat("expected one of ", absl::StrJoin(choices, ", "), ", got '", text, "'");
      },
      "", "choice");
}

CLI::Validator NumberIn(double min, double max) {
  return CLI::Validator(
      [min, max](std::string& text) -> std::string {
        errno = 0;
        char* end = nullptr;
        double v = std::strtod(text.c_str(), &end);
        // Decimal text only, as IntegerIn takes: strtod also reads hexadecimal ("--window 0x10"
        // ran 16 s windows) and skips leading blanks.
        const bool decimal = !text.empty() && text.find_first_of("xX") == std::string::npos &&
                             !std::isspace(static_cast<unsigned char>(text[0]));
        if (!decimal || end != text.c_str() + text.size() || errno == ERANGE || !std::isfinite(v) || v < min ||
            v > max) {
          return absl::StrCat("expected a number", RangeText(min, max), ", got '", text, "'");
        }
        return "";
      },
      "", "number");
}

}  // namespace aviary::common
