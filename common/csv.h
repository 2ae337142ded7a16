// CSV reading and writing (RFC 4180 plus what pandas writes and reads).
//
// Fields may be quoted with '"', contain commas, doubled quotes and newlines. A table keeps the
// 1-based line number each row starts on, so errors can name file:line.
#ifndef AVIARY_COMMON_CSV_H_
#define AVIARY_COMMON_CSV_H_

#include <cstddef>
#include <deque>
#include <optional>
#include <ostream>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace aviary::common {

// A parsed CSV file: a header and rows of string fields. Plain value, not synchronised.
class CsvTable {
 public:
  const std::string& source() const { return source_; }
  const std::vector<std::string>& header() const { return header_; }
  size_t num_rows() const { return rows_.size(); }
  const std::vector<std::string>& row(size_t i) const { return rows_[i]; }
  // The 1-based line in the file where row `i` starts.
  int line(size_t i) const { return lines_[i]; }
  // The 1-based line of the header (after blank lines, if any).
  int header_line() const { return header_line_; }

  // Index of column `name`, or nullopt.
  std::optional<size_t> ColumnIndex(absl::string_view name) const;
  // Index of column `name`; INVALID_ARGUMENT naming the file, the header's line and the columns
  // it does have.
  absl::StatusOr<size_t> RequireColumn(absl::string_view name) const;

  // Parses CSV text. Every row must have as many fields as the header; a short or long row is
  // an error naming `source_name`:line and both counts. Blank lines are skipped. A UTF-8 BOM and
  // CRLF line ends are accepted. With `columns`, only the columns named there (those the file
  // has) are kept, in the file's order: header() and the rows hold just those (a wide metadata
  // file then costs the memory of the columns used); every row is still checked in full.
  static absl::StatusOr<CsvTable> Parse(absl::string_view text, std::string source_name,
                                        const std::vector<std::string>* columns = nullptr);
  // Reads and parses a file (NOT_FOUND when it does not exist).
  static absl::StatusOr<CsvTable> ReadFile(const std::string& path,
                                           const std::vector<std::string>* columns = nullptr);

 private:
  std::string source_;
  std::vector<std::string> header_;
  std::vector<std::string> file_header_;  // every column of the file (for messages)
  int header_line_ = 1;
  std::vector<std::vector<std::string>> rows_;
  std::vector<int> lines_;
};

// Reads CSV text a row at a time without copying it: the streaming form of CsvTable::Parse for
// large files (the same format, the same errors). A field is a view into the text, or into the
// reader's own buffer when the field holds a doubled quote; views stay valid until the next call
// of Next() and while the text lives. Movable; not synchronised.
class CsvRowReader {
 public:
  // Reads the header (after a UTF-8 BOM and blank lines). INVALID_ARGUMENT naming
  // `source_name`:line for a malformed header, or an empty text.
  static absl::StatusOr<CsvRowReader> Open(absl::string_view text, std::string source_name);

  const std::string& source() const { return source_; }
  const std::vector<std::string>& header() const { return header_; }
  // The 1-based line the header is on (after a BOM and blank lines).
  int header_line() const { return header_line_; }
  // Index of column `name`, or nullopt.
  std::optional<size_t> ColumnIndex(absl::string_view name) const;
  // Index of column `name`; INVALID_ARGUMENT naming the file, the header's line and the columns
  // it does have.
  absl::StatusOr<size_t> RequireColumn(absl::string_view name) const;

  // The next row: true with as many `fields` as the header and the 1-based `line` the row starts
  // on; false after the last row. Blank lines are skipped. INVALID_ARGUMENT naming
  // `source`:line for a row with another number of fields or an unterminated quoted field (a
  // quote inside an unquoted field is a character of it, as pandas reads it).
  absl::StatusOr<bool> Next(std::vector<absl::string_view>* fields, int* line);

 private:
  CsvRowReader(absl::string_view text, std::string source) : text_(text), source_(std::move(source)) {}
  // Reads the fields of the next non-blank line, whatever their number.
  absl::StatusOr<bool> NextFields(std::vector<absl::string_view>* fields, int* line);
  // Reads the field at pos_ (the `index`th of its row) up to its separator or line end.
  absl::Status ReadField(size_t index, int row_line, absl::string_view* value);

  absl::string_view text_;
  size_t pos_ = 0;
  int line_ = 1;
  std::string source_;
  std::vector<std::string> header_;
  int header_line_ = 1;
  // Per field index, the value of a field that holds "" escapes or text after its closing quote
  // (a deque: growing it moves no string another field of the row points into).
  std::deque<std::string> unescaped_;
};

// Quotes a field when it holds a comma, quote, CR or LF (pandas' QUOTE_MINIMAL).
std::string CsvEscape(absl::string_view field);
// The same, appended to `out` (a large file built in one string).
void AppendCsvField(std::string* out, absl::string_view field);
// Writes one row followed by '\n'.
void WriteCsvRow(std::ostream& out, const std::vector<std::string>& fields);

// A window's end in seconds as a row id writes it ("FILE_10", "FILE_2.5"): whole seconds as an
// integer, else six decimals with trailing zeros dropped (ids past 10,000 s stay distinct).
// `aviary predict` writes its row ids so, and the synthetic soundscapes' solution.csv matches.
std::string WindowEndText(double end_s);

// Parses a Python list literal of strings as pandas writes secondary_labels:
// "[]", "['a', 'b']", "[\"o'brien\"]". Empty text and "nan" give an empty list.
// INVALID_ARGUMENT (quoting the text) for anything else.
absl::StatusOr<std::vector<std::string>> ParsePythonStringList(absl::string_view text);
// The inverse: "['a', 'b']" (double quotes for items holding a single quote).
std::string FormatPythonStringList(const std::vector<std::string>& items);

}  // namespace aviary::common

#endif  // AVIARY_COMMON_CSV_H_
