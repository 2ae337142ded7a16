#include "common/csv.h"

#include "common/files.h"


#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace aviary::common {

std::optional<size_t> CsvTable::ColumnIndex(absl::string_view name) const {
  for (size_t i = 0; i < header_.size(); ++i) {
    if (header_[i] == name) return i;
  }
  return std::nullopt;
}

absl::StatusOr<size_t> CsvTable::RequireColumn(absl::string_view name) const {
  if (auto i = ColumnIndex(name)) return *i;
  return absl::InvalidArgumentError(absl::StrCat(source_, ": missing column '", name,
                                                 "' (columns: ", absl::StrJoin(file_header_, ","), ")"));
}

absl::StatusOr<CsvTable> CsvTable::Parse(absl::string_view text, std::string source_name,
                                         const std::vector<std::string>* columns) {
  CsvTable table;
  table.source_ = std::move(source_name);
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);

  std::vector<std::string> fields;
  std::string field;
  // With `columns`: which fields of a row are kept (all while reading the header), and how many
  // fields the current row has.
  std::vector<bool> keep;
  size_t num_fields = 0;
  auto end_field = [&]() {
    if (keep.empty() || (num_fields < keep.size() && keep[num_fields])) fields.push_back(std::move(field));
    field.clear();
    ++num_fields;
  };
  bool in_quotes = false;
  bool field_was_quoted = false;
  int line = 1;
  int row_line = 1;
  bool have_header = false;
  size_t i = 0;
  const size_t n = text.size();

  size_t header_fields = 0;
  auto finish_row = [&]() -> absl::Status {
    // A line holding nothing at all is blank, not a row of one empty field.
    const bool blank = num_fields == 0 && field.empty() && !field_was_quoted;
    end_field();
    field_was_quoted = false;
    if (!blank) {
      if (!have_header) {
        header_fields = fields.size();
        table.file_header_ = fields;
        if (columns != nullptr) {
          keep.assign(fields.size(), false);
          std::vector<std::string> kept;
          for (size_t k = 0; k < fields.size(); ++k) {
            if (std::find(columns->begin(), columns->end(), fields[k]) == columns->end()) continue;
            keep[k] = true;
            kept.push_back(fields[k]);
          }
          fields = std::move(kept);
        }
        table.header_ = std::move(fields);
        have_header = true;
      } else {
        if (num_fields != header_fields) {
          return absl::InvalidArgumentError(absl::StrCat(
              table.source_, ":", row_line, ": expected ", header_fields,
              " fields (as the header), got ", num_fields));
        }
        table.rows_.push_back(std::move(fields));
        table.lines_.push_back(row_line);
      }
    }
    fields = std::vector<std::string>();
    fields.reserve(table.header_.size());
    num_fields = 0;
    return absl::OkStatus();
  };

  while (i < n) {
    char c = text[i];
    if (in_quotes) {
      if (c == '"') {
        if (i + 1 < n && text[i + 1] == '"') {
          field.push_back('"');
          i += 2;
          continue;
        }
        in_quotes = false;
        ++i;
        continue;
      }
      if (c == '\n') ++line;
      // The run up to the next quote or line end, at once.
      size_t j = i + 1;
      while (j < n && text[j] != '"' && text[j] != '\n') ++j;
      field.append(text.data() + i, j - i);
      i = j;
      continue;
    }
    if (c == '"') {
      if (!field.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            table.source_, ":", line, ": quote inside an unquoted field '", field, "\"'"));
      }
      in_quotes = true;
      field_was_quoted = true;
      ++i;
    } else if (c == ',') {
      end_field();
      ++i;
    } else if (c == '\r' || c == '\n') {
      AVIARY_RETURN_IF_ERROR(finish_row());
      if (c == '\r' && i + 1 < n && text[i + 1] == '\n') ++i;
      ++i;
      ++line;
      row_line = line;
    } else {
      // The run up to the next separator, quote or line end, at once.
      size_t j = i + 1;
      while (j < n && text[j] != ',' && text[j] != '"' && text[j] != '\r' && text[j] != '\n') ++j;
      field.append(text.data() + i, j - i);
      i = j;
    }
  }
  if (in_quotes) {
    return absl::InvalidArgumentError(
        absl::StrCat(table.source_, ":", row_line, ": unterminated quoted field"));
  }
  if (!field.empty() || num_fields > 0 || field_was_quoted) {
    AVIARY_RETURN_IF_ERROR(finish_row());
  }
  if (!have_header) {
    return absl::InvalidArgumentError(absl::StrCat(table.source_, ": empty CSV (no header)"));
  }
  return table;
}

absl::StatusOr<CsvTable> CsvTable::ReadFile(const std::string& path, const std::vector<std::string>* columns) {
  AVIARY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return Parse(text, path, columns);
}

std::string CsvEscape(absl::string_view field) {
  if (field.find_first_of(",\"\r\n") == absl::string_view::npos) return std::string(field);
  std::string out = "\"";
  for (char c : field) {
    if (c == '"') out.push_back('"');
    out.push_back(c);
  }
  out.push_back('"');
  return out;
}

void WriteCsvRow(std::ostream& out, const std::vector<std::string>& fields) {
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i) out << ',';
    out << CsvEscape(fields[i]);
  }
  out << '\n';
}

absl::StatusOr<std::vector<std::string>> ParsePythonStringList(absl::string_view text) {
  std::vector<std::string> items;
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a Python list of strings (", why, "): ", text));
  };
  size_t i = 0;
  auto skip_ws = [&] {
    while (i < text.size() && (text[i] == ' ' || text[i] == '\t')) ++i;
  };
  skip_ws();
  if (i == text.size() || text.substr(i) == "nan") return items;
  if (text[i] != '[') return bad("no '['");
  ++i;
  skip_ws();
  if (i < text.size() && text[i] == ']') {
    ++i;
    skip_ws();
    if (i != text.size()) return bad("text after ']'");
    return items;
  }
  while (true) {
    skip_ws();
    if (i >= text.size()) return bad("unterminated");
    char q = text[i];
    if (q != '\'' && q != '"') return bad("item is not quoted");
    ++i;
    std::string item;
    while (i < text.size() && text[i] != q) {
      if (text[i] == '\\' && i + 1 < text.size()) {
        ++i;
      }
      item.push_back(text[i]);
      ++i;
    }
    if (i >= text.size()) return bad("unterminated string");
    ++i;
    items.push_back(std::move(item));
    skip_ws();
    if (i >= text.size()) return bad("unterminated");
    if (text[i] == ',') {
      ++i;
      continue;
    }
    if (text[i] == ']') {
      ++i;
      skip_ws();
      if (i != text.size()) return bad("text after ']'");
      return items;
    }
    return bad("expected ',' or ']'");
  }
}

std::string FormatPythonStringList(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    char q = items[i].find('\'') != std::string::npos ? '"' : '\'';
    out += q;
    out += items[i];
    out += q;
  }
  out += "]";
  return out;
}

}  // namespace aviary::common
