#include "common/csv.h"

#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

TEST(CsvTableTest, ParsesQuotedFieldsCommasAndNewlines) {
  auto t = CsvTable::Parse(
      "primary_label,secondary_labels,author\n"
      "abc1,\"['x1', 'y2']\",\"Smith, J.\"\n"
      "def2,[],\"says \"\"hi\"\"\nover two lines\"\n",
      "m.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->num_rows(), 2u);
  EXPECT_EQ(t->row(0)[1], "['x1', 'y2']");
  EXPECT_EQ(t->row(0)[2], "Smith, J.");
  EXPECT_EQ(t->row(1)[2], "says \"hi\"\nover two lines");
  EXPECT_EQ(t->line(0), 2);
  EXPECT_EQ(t->line(1), 3);
}

TEST(CsvTableTest, AcceptsBomCrlfBlankLinesAndEmptyFields) {
  auto t = CsvTable::Parse("\xEF\xBB\xBF" "a,b\r\n1,\r\n\r\n,2\r\n", "x.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->header()[0], "a");
  ASSERT_EQ(t->num_rows(), 2u);
  EXPECT_EQ(t->row(0)[1], "");
  EXPECT_EQ(t->row(1)[0], "");
  EXPECT_EQ(t->line(1), 4);
}

// A line of spaces and tabs only is blank, as pandas reads it (it was "expected 2 fields, got 1").
TEST(CsvTableTest, ALineOfWhitespaceOnlyIsBlank) {
  auto t = CsvTable::Parse("a,b\n1,2\n   \n3,4\n\t \r\n5,6\n  ", "w.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->num_rows(), 3u);
  EXPECT_EQ(t->row(1), (std::vector<std::string>{"3", "4"}));
  EXPECT_EQ(t->line(1), 4);
  EXPECT_EQ(t->line(2), 6);
  // A lone blank value is written quoted, so that it reads back.
  std::ostringstream out;
  WriteCsvRow(out, {"name"});
  WriteCsvRow(out, {"  "});
  auto back = CsvTable::Parse(out.str(), "b.csv");
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->num_rows(), 1u);
  EXPECT_EQ(back->row(0), std::vector<std::string>{"  "});
}

TEST(CsvTableTest, NamesFileAndLineOfARaggedRow) {
  auto t = CsvTable::Parse("a,b,c\n1,2,3\n4,5\n", "meta.csv");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(), "meta.csv:3: expected 3 fields (as the header), got 2");
}

// A quoted field's lines count as a row's end counts them: "\r\n", '\r' or '\n' (a file of
// bare-CR line ends named line 4 for the 6th).
TEST(CsvTableTest, CountsAQuotedFieldsLinesWhateverTheirEnds) {
  for (const char* end : {"\n", "\r\n", "\r"}) {
    const std::string text = absl::StrCat("a,b,c", end, "1,\"x", end, "y", end, "z\",3", end, "4,5,6", end, "7,8,9,10", end);
    auto t = CsvTable::Parse(text, "meta.csv");
    ASSERT_FALSE(t.ok()) << absl::CEscape(end);
    EXPECT_EQ(t.status().message(), "meta.csv:6: expected 3 fields (as the header), got 4") << absl::CEscape(end);
  }
}

TEST(CsvTableTest, RejectsUnterminatedQuoteAndEmptyFile) {
  auto t = CsvTable::Parse("a,b\n\"open,2\n", "q.csv");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("q.csv:2: unterminated"), absl::string_view::npos);
  EXPECT_FALSE(CsvTable::Parse("", "e.csv").ok());
}

TEST(CsvTableTest, RequireColumnListsTheColumnsThereAre) {
  auto t = CsvTable::Parse("x,y\n1,2\n", "m.csv");
  ASSERT_TRUE(t.ok());
  auto c = t->RequireColumn("filename");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().message(), "m.csv:1: missing column 'filename' (columns: x,y)");
}

// Keeping some columns: the header and rows hold just those, in the file's order, with the same
// values a full parse gives; rows are still checked in full; messages list every column.
TEST(CsvTableTest, KeepsOnlyTheNamedColumns) {
  const std::string text =
      "rating,filename,notes,primary_label,x\n"
      "4.5,a/XC1.ogg,\"long, quoted\nnote\",abc1,\n"
      "\n"
      "3,b/XC2.ogg,,def2,\"\"\"q\"\"\"\n";
  const std::vector<std::string> columns{"primary_label", "filename", "missing"};
  auto some = CsvTable::Parse(text, "m.csv", &columns);
  auto all = CsvTable::Parse(text, "m.csv");
  ASSERT_TRUE(some.ok()) << some.status();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(some->header(), (std::vector<std::string>{"filename", "primary_label"}));
  ASSERT_EQ(some->num_rows(), 2u);
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(some->row(r), (std::vector<std::string>{all->row(r)[1], all->row(r)[3]}));
    EXPECT_EQ(some->line(r), all->line(r));
  }
  EXPECT_EQ(some->line(1), 5);
  EXPECT_EQ(all->row(1)[4], "\"q\"");
  EXPECT_EQ(some->RequireColumn("notes").status().message(),
            "m.csv:1: missing column 'notes' (columns: rating,filename,notes,primary_label,x)");
  auto ragged = CsvTable::Parse("a,b,c\n1,2,3\n4,5\n", "r.csv", &columns);
  ASSERT_FALSE(ragged.ok());
  EXPECT_EQ(ragged.status().message(), "r.csv:3: expected 3 fields (as the header), got 2");
  // A quote inside an unquoted field is a character of it (pandas and Python's csv read
  // `Tom "Birdman" Lee` so; it used to refuse the whole file), and after a closing quote too.
  auto quote = CsvTable::Parse("a,b\nTom \"Birdman\" Lee, \"b\"\n\"q\"r\"s,x\"\n", "q.csv");
  ASSERT_TRUE(quote.ok()) << quote.status();
  ASSERT_EQ(quote->num_rows(), 2u);
  EXPECT_EQ(quote->row(0), (std::vector<std::string>{"Tom \"Birdman\" Lee", " \"b\""}));
  EXPECT_EQ(quote->row(1), (std::vector<std::string>{"qr\"s", "x\""}));
}

// The reader hands out views: into the text for plain and quoted fields, into its own buffer
// for a field with doubled quotes; every field of a row stays valid until the next row.
TEST(CsvRowReaderTest, ReadsRowsAsViewsWithTheirLines) {
  const std::string text =
      "\xEF\xBB\xBF" "\n"
      "a,b,c\r\n"
      "1,\"x,y\",\"say \"\"hi\"\"\"\n"
      "\n"
      "\"two\nlines\",\"\"\"q\"\"\",3\n"
      "4,,\n";
  auto reader = CsvRowReader::Open(text, "r.csv");
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(reader->header(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(*reader->ColumnIndex("c"), 2u);
  EXPECT_EQ(reader->RequireColumn("d").status().message(), "r.csv:2: missing column 'd' (columns: a,b,c)");
  std::vector<absl::string_view> fields;
  int line = 0;
  ASSERT_TRUE(*reader->Next(&fields, &line));
  EXPECT_EQ(line, 3);
  EXPECT_EQ(fields, (std::vector<absl::string_view>{"1", "x,y", "say \"hi\""}));
  EXPECT_TRUE(fields[1].data() > text.data() && fields[1].data() < text.data() + text.size());  // a view
  ASSERT_TRUE(*reader->Next(&fields, &line));
  EXPECT_EQ(line, 5);
  EXPECT_EQ(fields, (std::vector<absl::string_view>{"two\nlines", "\"q\"", "3"}));
  ASSERT_TRUE(*reader->Next(&fields, &line));
  EXPECT_EQ(line, 7);
  EXPECT_EQ(fields, (std::vector<absl::string_view>{"4", "", ""}));
  EXPECT_FALSE(*reader->Next(&fields, &line));
  EXPECT_FALSE(*reader->Next(&fields, &line));

  auto ragged = CsvRowReader::Open("a,b\n1,2\n3\n", "g.csv");
  ASSERT_TRUE(*ragged->Next(&fields, &line));
  EXPECT_EQ(ragged->Next(&fields, &line).status().message(), "g.csv:3: expected 2 fields (as the header), got 1");
  EXPECT_EQ(CsvRowReader::Open("\n\r\n", "e.csv").status().message(), "e.csv: empty CSV (no header)");
}

// The parser as it was written first, a character at a time: the reference the reader is
// checked against on random texts.
struct ReferenceTable {
  std::vector<std::vector<std::string>> rows;  // the header first
  std::vector<int> lines;
  std::string error;
};
ReferenceTable ReferenceParse(absl::string_view text, const std::string& source) {
  ReferenceTable t;
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  std::vector<std::string> fields;
  std::string field;
  bool in_quotes = false, was_quoted = false;
  bool field_quoted = false;  // this field opened with a quote
  int line = 1, row_line = 1;
  size_t header_fields = 0;
  auto finish_row = [&]() -> bool {
    // Nothing but spaces and tabs (pandas' skip_blank_lines).
    const bool blank = fields.empty() && field.find_first_not_of(" \t") == std::string::npos && !was_quoted;
    fields.push_back(field);
    field.clear();
    was_quoted = false;
    field_quoted = false;
    if (!blank) {
      if (!t.rows.empty() && fields.size() != header_fields) {
        t.error = absl::StrCat(source, ":", row_line, ": expected ", header_fields, " fields (as the header), got ",
                               fields.size());
        return false;
      }
      if (t.rows.empty()) header_fields = fields.size();
      t.rows.push_back(fields);
      t.lines.push_back(row_line);
    }
    fields.clear();
    return true;
  };
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_quotes) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
        field.push_back('"');
        ++i;
      } else if (c == '"') {
        in_quotes = false;
      } else {
        // A line end as a row's: '\n', a lone '\r' ("\r\n" counts at its '\n').
        if (c == '\n' || (c == '\r' && (i + 1 == text.size() || text[i + 1] != '\n'))) ++line;
        field.push_back(c);
      }
    } else if (c == '"') {
      if (!field.empty() || field_quoted) {
        field.push_back('"');  // a character of the field, as pandas reads it
      } else {
        in_quotes = was_quoted = field_quoted = true;
      }
    } else if (c == ',') {
      fields.push_back(field);
      field.clear();
      field_quoted = false;
    } else if (c == '\r' || c == '\n') {
      if (!finish_row()) return t;
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      row_line = ++line;
    } else {
      field.push_back(c);
    }
  }
  if (in_quotes) {
    t.error = absl::StrCat(source, ":", row_line, ": unterminated quoted field");
    return t;
  }
  if (!field.empty() || !fields.empty() || was_quoted) finish_row();
  if (t.rows.empty() && t.error.empty()) t.error = absl::StrCat(source, ": empty CSV (no header)");
  return t;
}

// Random texts over the characters that matter (separators, quotes, line ends, a letter):
// CsvTable::Parse (on the reader) gives the reference's rows, lines and error messages.
TEST(CsvRowReaderTest, AgreesWithACharacterAtATimeParserOnRandomTexts) {
  std::mt19937 rng(12345);
  const char alphabet[] = {'a', 'b', ',', '"', '\n', '\r', ' ', '\t'};
  int ok = 0, failed = 0;
  for (int n = 0; n < 20000; ++n) {
    std::string text;
    const int length = static_cast<int>(rng() % 24);
    for (int i = 0; i < length; ++i) {
      // Mostly well-formed: letters and separators more often than quotes.
      const uint32_t pick = rng() % 16;
      text.push_back(pick < 6 ? alphabet[pick % 2] : pick < 10 ? ',' : pick < 12 ? '\n' : alphabet[3 + pick % 5]);
    }
    const ReferenceTable want = ReferenceParse(text, "f.csv");
    auto got = CsvTable::Parse(text, "f.csv");
    ASSERT_EQ(got.ok(), want.error.empty()) << "text: '" << absl::CEscape(text) << "' reference error: " << want.error
                                            << " got: " << got.status();
    if (!got.ok()) {
      ++failed;
      ASSERT_EQ(got.status().message(), want.error) << absl::CEscape(text);
      continue;
    }
    ++ok;
    ASSERT_EQ(got->header(), want.rows[0]) << absl::CEscape(text);
    ASSERT_EQ(got->num_rows() + 1, want.rows.size()) << absl::CEscape(text);
    for (size_t r = 0; r < got->num_rows(); ++r) {
      ASSERT_EQ(got->row(r), want.rows[r + 1]) << absl::CEscape(text);
      ASSERT_EQ(got->line(r), want.lines[r + 1]) << absl::CEscape(text);
    }
  }
  EXPECT_GT(ok, 2000);  // both outcomes are exercised
  EXPECT_GT(failed, 2000);
}

TEST(CsvTableTest, MissingFileIsNotFound) {
  auto t = CsvTable::ReadFile("/nonexistent/dir/meta.csv");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("/nonexistent/dir/meta.csv"), absl::string_view::npos);
}

TEST(CsvWriteTest, EscapesRoundTrip) {
  std::ostringstream out;
  WriteCsvRow(out, {"plain", "with,comma", "with \"quote\"", "multi\nline"});
  auto t = CsvTable::Parse("a,b,c,d\n" + out.str(), "w.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->row(0), (std::vector<std::string>{"plain", "with,comma", "with \"quote\"", "multi\nline"}));
}

// A one-column row with an empty value is written "" (an empty line would be skipped as blank).
TEST(CsvWriteTest, AnEmptyOnlyFieldSurvives) {
  std::ostringstream out;
  WriteCsvRow(out, {"name"});
  WriteCsvRow(out, {""});
  WriteCsvRow(out, {"x"});
  EXPECT_EQ(out.str(), "name\n\"\"\nx\n");
  auto t = CsvTable::Parse(out.str(), "w.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->num_rows(), 2u);
  EXPECT_EQ(t->row(0), std::vector<std::string>{""});
  EXPECT_EQ(t->row(1), std::vector<std::string>{"x"});
}

TEST(PythonListTest, ParsesPandasSecondaryLabels) {
  EXPECT_EQ(*ParsePythonStringList("[]"), std::vector<std::string>{});
  EXPECT_EQ(*ParsePythonStringList(""), std::vector<std::string>{});
  EXPECT_EQ(*ParsePythonStringList("nan"), std::vector<std::string>{});
  EXPECT_EQ(*ParsePythonStringList("['a1', 'b2']"), (std::vector<std::string>{"a1", "b2"}));
  EXPECT_EQ(*ParsePythonStringList("[\"o'brien\", 'x']"),
            (std::vector<std::string>{"o'brien", "x"}));
  EXPECT_EQ(*ParsePythonStringList("['Sciurus carolinensis_Eastern Gray Squirrel']"),
            (std::vector<std::string>{"Sciurus carolinensis_Eastern Gray Squirrel"}));
}

TEST(PythonListTest, RejectsMalformedText) {
  for (const char* bad : {"a, b", "['a'", "['a' 'b']", "[a]", "['a'] x"}) {
    auto r = ParsePythonStringList(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find(bad), absl::string_view::npos);
  }
}

TEST(PythonListTest, FormatRoundTrips) {
  std::vector<std::string> items{"a1", "o'brien"};
  EXPECT_EQ(FormatPythonStringList(items), "['a1', \"o'brien\"]");
  EXPECT_EQ(*ParsePythonStringList(FormatPythonStringList(items)), items);
  // Both quotes, a backslash, control characters: as Python's repr() writes them.
  const std::vector<std::string> hard{"a'b\"c", "a\\b", "tab\there\nnl", std::string("nul\0x", 5), "\x01"};
  EXPECT_EQ(FormatPythonStringList(hard), "['a\\'b\"c', 'a\\\\b', 'tab\\there\\nnl', 'nul\\x00x', '\\x01']");
  EXPECT_EQ(*ParsePythonStringList(FormatPythonStringList(hard)), hard);
  // An escape Python does not know keeps its backslash ('\d' is the two characters).
  EXPECT_EQ(*ParsePythonStringList("['a\\d']"), std::vector<std::string>{"a\\d"});
  // \x, \u and \U are code points, as Python's repr writes U+00A0 and U+200B: UTF-8 here.
  EXPECT_EQ(*ParsePythonStringList("['a\\xa0b', '\\u200b', '\\U0001F426']"),
            (std::vector<std::string>{"a\xC2\xA0" "b", "\xE2\x80\x8B", "\xF0\x9F\x90\xA6"}));
}

}  // namespace
}  // namespace aviary::common
