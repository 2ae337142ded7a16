#include "common/csv.h"

#include "common/files.h"


#include <algorithm>
#include <cstdint>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace aviary::common {

namespace {

std::optional<size_t> IndexIn(const std::vector<std::string>& header, absl::string_view name) {
  for (size_t i = 0; i < header.size(); ++i) {
    if (header[i] == name) return i;
  }
  return std::nullopt;
}

// Names the header's line: the place a column would be.
absl::Status MissingColumn(absl::string_view source, int header_line, absl::string_view name,
                           const std::vector<std::string>& file_header) {
  return absl::InvalidArgumentError(absl::StrCat(source, ":", header_line, ": missing column '", name,
                                                 "' (columns: ", absl::StrJoin(file_header, ","), ")"));
}

}  // namespace

std::optional<size_t> CsvTable::ColumnIndex(absl::string_view name) const { return IndexIn(header_, name); }

absl::StatusOr<size_t> CsvTable::RequireColumn(absl::string_view name) const {
  if (auto i = ColumnIndex(name)) return *i;
  return MissingColumn(source_, header_line_, name, file_header_);
}

std::optional<size_t> CsvRowReader::ColumnIndex(absl::string_view name) const { return IndexIn(header_, name); }

absl::StatusOr<size_t> CsvRowReader::RequireColumn(absl::string_view name) const {
  if (auto i = ColumnIndex(name)) return *i;
  return MissingColumn(source_, header_line_, name, header_);
}

namespace {

// The characters that end an unquoted run: separator, quote, line ends.
struct SpecialChars {
  bool is[256] = {};
  constexpr SpecialChars() {
    is[static_cast<unsigned char>(',')] = true;
    is[static_cast<unsigned char>('"')] = true;
    is[static_cast<unsigned char>('\r')] = true;
    is[static_cast<unsigned char>('\n')] = true;
  }
};
constexpr SpecialChars kSpecial;

size_t EndOfRun(absl::string_view text, size_t pos) {
  while (pos < text.size() && !kSpecial.is[static_cast<unsigned char>(text[pos])]) ++pos;
  return pos;
}

}  // namespace

absl::StatusOr<CsvRowReader> CsvRowReader::Open(absl::string_view text, std::string source_name) {
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  CsvRowReader reader(text, std::move(source_name));
  std::vector<absl::string_view> fields;
  int line = 0;
  AVIARY_ASSIGN_OR_RETURN(bool have_header, reader.NextFields(&fields, &line));
  if (!have_header) {
    return absl::InvalidArgumentError(absl::StrCat(reader.source_, ": empty CSV (no header)"));
  }
  reader.header_line_ = line;
  for (absl::string_view field : fields) reader.header_.emplace_back(field);
  return reader;
}

namespace {

// The line ends in `text` as a row's end counts them: "\r\n", a lone '\r' and a lone '\n' one
// each (a quoted field's lines in a file of bare-CR line ends were not counted).
int LineEnds(absl::string_view text) {
  int ends = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\n' || (text[i] == '\r' && (i + 1 == text.size() || text[i + 1] != '\n'))) ++ends;
  }
  return ends;
}

}  // namespace

absl::StatusOr<bool> CsvRowReader::Next(std::vector<absl::string_view>* fields, int* line) {
  AVIARY_ASSIGN_OR_RETURN(bool more, NextFields(fields, line));
  if (more && fields->size() != header_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ":", *line, ": expected ", header_.size(),
                                                   " fields (as the header), got ", fields->size()));
  }
  return more;
}

absl::StatusOr<bool> CsvRowReader::NextFields(std::vector<absl::string_view>* fields, int* line) {
  fields->clear();
  const size_t n = text_.size();
  // Blank lines (nothing but spaces and tabs before the line end, as pandas' skip_blank_lines
  // takes them) are no rows.
  while (pos_ < n) {
    size_t end = pos_;
    while (end < n && (text_[end] == ' ' || text_[end] == '\t')) ++end;
    if (end < n && text_[end] != '\r' && text_[end] != '\n') break;
    pos_ = end;
    if (pos_ >= n) break;
    if (text_[pos_] == '\r' && pos_ + 1 < n && text_[pos_ + 1] == '\n') ++pos_;
    ++pos_;
    ++line_;
  }
  if (pos_ >= n) return false;
  const int row_line = line_;
  while (true) {
    absl::string_view value;
    AVIARY_RETURN_IF_ERROR(ReadField(fields->size(), row_line, &value));
    fields->push_back(value);
    if (pos_ >= n) break;
    const char c = text_[pos_++];
    if (c == ',') {
      if (pos_ < n) continue;
      fields->push_back(absl::string_view());  // "a," at the end of the text: a last empty field
      break;
    }
    if (c == '\r' && pos_ < n && text_[pos_] == '\n') ++pos_;  // '\r', '\n' or "\r\n"
    ++line_;
    break;
  }
  *line = row_line;
  return true;
}

absl::Status CsvRowReader::ReadField(size_t index, int row_line, absl::string_view* value) {
  const size_t n = text_.size();
  if (pos_ >= n || text_[pos_] != '"') {
    // A quote inside an unquoted field is a character of it, as pandas and Python's csv read it
    // (`Tom "Birdman" Lee`, ` "b"` after a comma).
    size_t end = EndOfRun(text_, pos_);
    while (end < n && text_[end] == '"') end = EndOfRun(text_, end + 1);
    *value = text_.substr(pos_, end - pos_);
    pos_ = end;
    return absl::OkStatus();
  }
  // Quoted: up to the closing quote, "" standing for one quote; newlines are part of the value.
  std::string* copy = nullptr;  // the value when it is not one run of the text
  size_t begin = ++pos_;
  while (true) {
    const size_t quote = text_.find('"', pos_);
    if (quote == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ":", row_line, ": unterminated quoted field"));
    }
    line_ += LineEnds(text_.substr(pos_, quote - pos_));
    if (quote + 1 < n && text_[quote + 1] == '"') {  // an escaped quote
      if (copy == nullptr) {
        while (unescaped_.size() <= index) unescaped_.emplace_back();
        copy = &unescaped_[index];
        copy->clear();
      }
      copy->append(text_.data() + begin, quote + 1 - begin);
      pos_ = begin = quote + 2;
      continue;
    }
    pos_ = quote + 1;
    if (copy == nullptr) {
      *value = text_.substr(begin, quote - begin);
    } else {
      copy->append(text_.data() + begin, quote - begin);
    }
    break;
  }
  // Text after the closing quote belongs to the field too, quotes in it as characters (as pandas
  // reads it: `"q"r"s` is `qr"s`).
  size_t end = EndOfRun(text_, pos_);
  while (end < n && text_[end] == '"') end = EndOfRun(text_, end + 1);
  if (end == pos_) {
    if (copy != nullptr) *value = *copy;
    return absl::OkStatus();
  }
  if (copy == nullptr) {
    while (unescaped_.size() <= index) unescaped_.emplace_back();
    copy = &unescaped_[index];
    copy->assign(value->data(), value->size());
  }
  copy->append(text_.data() + pos_, end - pos_);
  pos_ = end;
  *value = *copy;
  return absl::OkStatus();
}

absl::StatusOr<CsvTable> CsvTable::Parse(absl::string_view text, std::string source_name,
                                         const std::vector<std::string>* columns) {
  AVIARY_ASSIGN_OR_RETURN(CsvRowReader reader, CsvRowReader::Open(text, std::move(source_name)));
  CsvTable table;
  table.source_ = reader.source();
  table.file_header_ = reader.header();
  table.header_line_ = reader.header_line();
  std::vector<size_t> kept;  // the file's columns kept, in its order
  for (size_t k = 0; k < table.file_header_.size(); ++k) {
    if (columns != nullptr &&
        std::find(columns->begin(), columns->end(), table.file_header_[k]) == columns->end()) {
      continue;
    }
    kept.push_back(k);
    table.header_.push_back(table.file_header_[k]);
  }
  std::vector<absl::string_view> fields;
  int line = 0;
  while (true) {
    AVIARY_ASSIGN_OR_RETURN(bool more, reader.Next(&fields, &line));
    if (!more) break;
    std::vector<std::string> row;
    row.reserve(kept.size());
    for (size_t k : kept) row.emplace_back(fields[k]);
    table.rows_.push_back(std::move(row));
    table.lines_.push_back(line);
  }
  return table;
}

absl::StatusOr<CsvTable> CsvTable::ReadFile(const std::string& path, const std::vector<std::string>* columns) {
  AVIARY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return Parse(text, path, columns);
}

std::string CsvEscape(absl::string_view field) {
  std::string out;
  AppendCsvField(&out, field);
  return out;
}

void AppendCsvField(std::string* out, absl::string_view field) {
  if (field.find_first_of(",\"\r\n") == absl::string_view::npos) {
    out->append(field.data(), field.size());
    return;
  }
  out->push_back('"');
  for (char c : field) {
    if (c == '"') out->push_back('"');
    out->push_back(c);
  }
  out->push_back('"');
}

void WriteCsvRow(std::ostream& out, const std::vector<std::string>& fields) {
  // One empty (or blank) field would be a blank line, which readers skip: quote it (as Python's
  // csv does the empty one).
  if (fields.size() == 1 && fields[0].find_first_not_of(" \t") == std::string::npos) {
    out << '"' << fields[0] << "\"\n";
    return;
  }
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i) out << ',';
    out << CsvEscape(fields[i]);
  }
  out << '\n';
}

namespace {
// `code` (a Unicode scalar value) as UTF-8.
void AppendUtf8(uint32_t code, std::string* out) {
  if (code < 0x80) {
    out->push_back(static_cast<char>(code));
  } else if (code < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (code >> 6)));
    out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
  } else if (code < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (code >> 12)));
    out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (code >> 18)));
    out->push_back(static_cast<char>(0x80 | ((code >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
  }
}
}  // namespace

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
        // Python's string escapes (what repr writes); an unknown one keeps its backslash. \xNN,
        // \uNNNN and \UNNNNNNNN are code points (repr writes U+00A0 as \xa0), kept as UTF-8.
        const char e = text[++i];
        const size_t digits = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
        if (digits > 0 && i + digits < text.size() &&
            std::all_of(text.begin() + i + 1, text.begin() + i + 1 + digits,
                        [](char c) { return absl::ascii_isxdigit(static_cast<unsigned char>(c)); })) {
          const uint32_t code = static_cast<uint32_t>(std::stoul(std::string(text.substr(i + 1, digits)), nullptr, 16));
          if (code <= 0x10FFFF && (code < 0xD800 || code > 0xDFFF)) {
            AppendUtf8(code, &item);
            i += 1 + digits;
            continue;
          }
        }
        switch (e) {
          case 'n': item.push_back('\n'); break;
          case 'r': item.push_back('\r'); break;
          case 't': item.push_back('\t'); break;
          case '\\': case '\'': case '"': item.push_back(e); break;
          default: item.push_back('\\'); item.push_back(e); break;
        }
        ++i;
        continue;
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
  // As Python's repr() writes each string: single quotes unless the item holds one and no double
  // quote; backslashes, the quote and control characters escaped (bytes >= 0x80 as they are).
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    const std::string& item = items[i];
    const char q = item.find('\'') != std::string::npos && item.find('"') == std::string::npos ? '"' : '\'';
    out += q;
    for (const char c : item) {
      if (c == '\\' || c == q) {
        out += '\\';
        out += c;
      } else if (c == '\n') {
        out += "\\n";
      } else if (c == '\r') {
        out += "\\r";
      } else if (c == '\t') {
        out += "\\t";
      } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        out += absl::StrFormat("\\x%02x", static_cast<unsigned char>(c));
      } else {
        out += c;
      }
    }
    out += q;
  }
  out += "]";
  return out;
}

std::string WindowEndText(double end_s) {
  const double rounded = std::round(end_s);
  if (std::abs(end_s - rounded) < 1e-9) return absl::StrCat(static_cast<int64_t>(rounded));
  // Six decimals, trailing zeros dropped: "%.6g" kept six digits in all, and ids past 10,000 s
  // collided (10000.05 and 10000 both read "10000").
  std::string end = absl::StrFormat("%.6f", end_s);
  while (!end.empty() && end.back() == '0') end.pop_back();
  if (!end.empty() && end.back() == '.') end.pop_back();
  return end;
}

}  // namespace aviary::common
