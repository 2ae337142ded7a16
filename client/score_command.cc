// aviary score --solution S.csv --submission P.csv [--json]
//
// Scores a BirdCLEF-format submission against its solution: both CSVs have a `row_id` column
// and one column per class. Rows are matched by row_id and columns by name (any order); the
// solution's class columns and their order define the classes (argmax ties for the accuracy
// go to the first class in the solution's order).
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/csv.h"
#include "common/metrics.h"
#include "common/status.h"
#include "client/commands.h"

namespace aviary::cli {
namespace {

using common::BinaryLabels;
using common::CsvTable;
using common::MetricValue;

constexpr char kRowId[] = "row_id";
constexpr char kUsage[] = "Usage";  // Kaggle's public/private split column in a solution file

struct ScoringInput {
  std::vector<std::string> classes;
  BinaryLabels truth;
  std::vector<double> scores;  // row-major, rows in solution order, columns in `classes` order
};

std::string Located(const CsvTable& table, size_t row) {
  return absl::StrCat(table.source(), ":", table.line(row));
}

// A finite number from cell (row, col); INVALID_ARGUMENT naming file:line and the column.
absl::StatusOr<double> ParseCell(const CsvTable& table, size_t row, size_t col) {
  const std::string& text = table.row(row)[col];
  double value = 0.0;
  // Decimal only: SimpleAtod (strtod) reads "0x10" as 16, where pandas, and so Kaggle's scorer,
  // reads the column as text and fails.
  if (text.find_first_of("xX") != std::string::npos || !absl::SimpleAtod(absl::string_view(text), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(Located(table, row), ": column '",
                                                   table.header()[col],
                                                   "': not a number: '", text, "'"));
  }
  if (!std::isfinite(value)) {
    return absl::InvalidArgumentError(absl::StrCat(Located(table, row), ": column '",
                                                   table.header()[col], "': '", text,
                                                   "' is not a finite number"));
  }
  return value;
}

// Maps each row_id to its row; INVALID_ARGUMENT for a duplicate, naming both lines.
absl::StatusOr<std::unordered_map<std::string, size_t>> IndexRowIds(const CsvTable& table,
                                                                    size_t id_col) {
  std::unordered_map<std::string, size_t> index;
  index.reserve(table.num_rows());
  for (size_t r = 0; r < table.num_rows(); ++r) {
    auto [it, inserted] = index.emplace(table.row(r)[id_col], r);
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat(Located(table, r), ": duplicate row_id '", table.row(r)[id_col],
                       "' (first at line ", table.line(it->second), ")"));
    }
  }
  return index;
}

absl::Status CheckUniqueHeader(const CsvTable& table) {
  std::unordered_map<std::string, size_t> seen;
  for (size_t c = 0; c < table.header().size(); ++c) {
    if (!seen.emplace(table.header()[c], c).second) {
      return absl::InvalidArgumentError(absl::StrCat(table.source(), ":", table.header_line(), ": duplicate column '",
                                                     table.header()[c], "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoringInput> LoadScoringInput(const std::string& solution_path,
                                              const std::string& submission_path) {
  AVIARY_ASSIGN_OR_RETURN(CsvTable solution, CsvTable::ReadFile(solution_path));
  AVIARY_ASSIGN_OR_RETURN(CsvTable submission, CsvTable::ReadFile(submission_path));
  AVIARY_RETURN_IF_ERROR(CheckUniqueHeader(solution));
  AVIARY_RETURN_IF_ERROR(CheckUniqueHeader(submission));
  AVIARY_ASSIGN_OR_RETURN(size_t solution_id_col, solution.RequireColumn(kRowId));
  AVIARY_ASSIGN_OR_RETURN(size_t submission_id_col, submission.RequireColumn(kRowId));

  // Columns by name: the solution's class columns, in its order.
  ScoringInput input;
  std::vector<size_t> solution_cols, submission_cols;
  std::vector<std::string> missing, extra;
  // Kaggle's solution files carry a `Usage` column (Public/Private), which its scorer drops.
  const std::optional<size_t> usage_col = solution.ColumnIndex(kUsage);
  for (size_t c = 0; c < solution.header().size(); ++c) {
    if (c == solution_id_col || c == usage_col) continue;
    const std::string& name = solution.header()[c];
    input.classes.push_back(name);
    solution_cols.push_back(c);
    if (auto sc = submission.ColumnIndex(name)) {
      submission_cols.push_back(*sc);
    } else {
      missing.push_back(name);
    }
  }
  for (size_t c = 0; c < submission.header().size(); ++c) {
    const std::string& name = submission.header()[c];
    if (c == submission_id_col || name == kUsage) continue;
    // An unnamed column: pandas' index, written without index=False (it printed "extra 1 ()").
    if (!solution.ColumnIndex(name)) extra.push_back(name.empty() ? "an unnamed column, pandas' index?" : name);
  }
  if (!missing.empty() || !extra.empty()) {
    std::string message = absl::StrCat(submission.source(), ":", submission.header_line(),
                                       ": class columns differ from ", solution.source(), ":",
                                       solution.header_line(), ":");
    if (!missing.empty()) {
      absl::StrAppend(&message, " missing ", missing.size(), " (", absl::StrJoin(missing, ","),
                      ")");
    }
    if (!extra.empty()) {
      absl::StrAppend(&message, missing.empty() ? "" : ";", " extra ", extra.size(), " (",
                      absl::StrJoin(extra, ","), ")");
    }
    return absl::InvalidArgumentError(message);
  }
  if (input.classes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(solution.source(), ": no class columns besides row_id"));
  }

  if (solution.num_rows() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(solution.source(), ": no rows to score"));
  }

  // Rows by row_id: every solution row needs exactly one submission row and vice versa.
  AVIARY_ASSIGN_OR_RETURN(auto solution_rows, IndexRowIds(solution, solution_id_col));
  AVIARY_ASSIGN_OR_RETURN(auto submission_rows, IndexRowIds(submission, submission_id_col));
  for (size_t r = 0; r < submission.num_rows(); ++r) {
    const std::string& id = submission.row(r)[submission_id_col];
    if (solution_rows.count(id) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(Located(submission, r), ": row_id '", id,
                                                     "' is not in ", solution.source()));
    }
  }
  std::vector<size_t> submission_row_of(solution.num_rows());
  size_t num_missing = 0;
  std::string first_missing;
  for (size_t r = 0; r < solution.num_rows(); ++r) {
    const std::string& id = solution.row(r)[solution_id_col];
    auto it = submission_rows.find(id);
    if (it == submission_rows.end()) {
      if (num_missing++ == 0) {
        first_missing = absl::StrCat("row_id '", id, "' (", Located(solution, r), ")");
      }
      continue;
    }
    submission_row_of[r] = it->second;
  }
  if (num_missing > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        submission.source(), ": no row for ", first_missing,
        num_missing > 1 ? absl::StrCat(" and ", num_missing - 1, " more row_ids") : ""));
  }

  const size_t rows = solution.num_rows(), cols = input.classes.size();
  input.truth = BinaryLabels(rows, cols);
  input.scores.resize(rows * cols);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t k = 0; k < cols; ++k) {
      AVIARY_ASSIGN_OR_RETURN(double truth, ParseCell(solution, r, solution_cols[k]));
      if (truth != 0.0 && truth != 1.0) {
        return absl::InvalidArgumentError(absl::StrCat(
            Located(solution, r), ": column '", input.classes[k], "': truth must be 0 or 1, got '",
            solution.row(r)[solution_cols[k]], "' (metrics take binary truth)"));
      }
      input.truth.at(r, k) = truth == 1.0 ? 1 : 0;
      AVIARY_ASSIGN_OR_RETURN(input.scores[r * cols + k],
                              ParseCell(submission, submission_row_of[r], submission_cols[k]));
    }
  }
  return input;
}

// Accuracy of a soundscape solution: over the rows with a positive label, the share whose
// highest score (the first, on a tie) is one of the row's positive classes. A row without a
// positive (no bird in the window) has no right answer and is left out, and a row with two
// species is right when either one scores highest. (The trainer's val_acc compares the argmax of
// one-hot labels, Keras's categorical accuracy: for one-hot rows the two agree.)
MetricValue SoundscapeAccuracy(const common::BinaryLabels& truth, const std::vector<double>& scores,
                               size_t* rows_with_positive) {
  size_t counted = 0, hits = 0;
  for (size_t r = 0; r < truth.rows; ++r) {
    bool positive = false;
    size_t best = 0;
    for (size_t k = 0; k < truth.cols; ++k) {
      positive = positive || truth(r, k) != 0;
      if (scores[r * truth.cols + k] > scores[r * truth.cols + best]) best = k;
    }
    if (!positive) continue;
    ++counted;
    if (truth(r, best) != 0) ++hits;
  }
  *rows_with_positive = counted;
  MetricValue out;
  if (counted == 0) {
    out.undefined_reason = "no row has a positive label";
  } else {
    out.value = static_cast<double>(hits) / static_cast<double>(counted);
  }
  return out;
}

std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (char ch : text) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(ch));
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string JsonNumber(const MetricValue& m) {
  return m.defined() ? absl::StrFormat("%.17g", m.value) : "null";
}

struct ScoreArgs {
  std::string solution;
  std::string submission;
  bool json = false;
};

int RunScore(const ScoreArgs& args) {
  auto fail = [](const absl::Status& st) {
    std::cerr << "aviary score: " << st.message() << "\n";
    return ExitCodeFor(st);
  };
  auto input = LoadScoringInput(args.solution, args.submission);
  if (!input.ok()) return fail(input.status());
  common::MatrixView<double> scores(input->scores, input->truth.rows, input->truth.cols);
  auto metrics = common::ComputeEvalMetrics(input->truth, scores);
  if (!metrics.ok()) return fail(metrics.status());
  size_t accuracy_rows = 0;
  metrics->val_acc = SoundscapeAccuracy(input->truth, input->scores, &accuracy_rows);
  // The class a reason names by its index, by its column too (182 columns are not counted by eye).
  for (common::MetricValue* value : {&metrics->val_roc_auc, &metrics->val_cmap, &metrics->val_auc}) {
    const int64_t c = value->undefined_class;
    if (value->defined() || c < 0 || c >= static_cast<int64_t>(input->classes.size())) continue;
    absl::StrAppend(&value->undefined_reason, "; class ", c, " is the column '", input->classes[c], "' of ",
                    args.solution);
  }

  const std::pair<const char*, const MetricValue*> named[] = {
      {"macro_roc_auc", &metrics->val_roc_auc},
      {"padded_cmap", &metrics->val_cmap},
      {"micro_pr_auc", &metrics->val_auc},
      {"accuracy", &metrics->val_acc},
  };
  if (args.json) {
    std::string undefined;
    std::string out = absl::StrCat("{\"rows\": ", input->truth.rows,
                                   ", \"classes\": ", input->truth.cols,
                                   ", \"scored_classes\": ", metrics->scored_classes.size(),
                                   ", \"accuracy_rows\": ", accuracy_rows);
    for (const auto& [name, value] : named) {
      absl::StrAppend(&out, ", \"", name, "\": ", JsonNumber(*value));
      if (!value->defined()) {
        absl::StrAppend(&undefined, undefined.empty() ? "" : ", ", "\"", name,
                        "\": ", JsonString(value->undefined_reason));
      }
    }
    std::cout << out << ", \"undefined\": {" << undefined << "}}\n";
    return 0;
  }
  const std::string accuracy_label = absl::StrCat("accuracy (", accuracy_rows, " rows with a label)");
  const char* labels[] = {"macro ROC-AUC (BirdCLEF 2024)", "padded cmAP (5 rows)",
                          "micro PR-AUC (val_auc)", accuracy_label.c_str()};
  std::cout << input->truth.rows << " rows, " << input->truth.cols << " classes ("
            << metrics->scored_classes.size() << " with a positive label)\n";
  for (size_t i = 0; i < 4; ++i) {
    const MetricValue& m = *named[i].second;
    std::cout << absl::StrFormat("  %-30s %s\n", labels[i],
                                 m.defined() ? absl::StrFormat("%.6f", m.value)
                                             : absl::StrCat("nan (", m.undefined_reason, ")"));
  }
  return 0;
}

}  // namespace

void AddScoreCommand(CLI::App* app, Runner* run) {
  auto args = std::make_shared<ScoreArgs>();
  CLI::App* score = common::AddCommand(
      app, "score", "the validation metrics of a submission",
      "BirdCLEF 2024's macro ROC-AUC, padded cmAP (5 rows), micro PR-AUC (val_auc) and accuracy (over "
      "the rows with a positive label: right when the top score is one of them); rows matched by "
      "row_id, columns by name.");
  score->group(kOfflineGroup);
  score->add_option("--solution", args->solution, "the truth: row_id and one 0/1 column per class")
      ->type_name("S.csv")
      ->required();
  score->add_option("--submission", args->submission, "the prediction: row_id and one column per class")
      ->type_name("P.csv")
      ->required();
  score->add_flag("--json", args->json, "one JSON object");
  score->callback([run, args] { *run = [args] { return RunScore(*args); }; });
}

}  // namespace aviary::cli
