#include "common/csv.h"

#include <sstream>
#include <string>
#include <vector>

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

TEST(CsvTableTest, NamesFileAndLineOfARaggedRow) {
  auto t = CsvTable::Parse("a,b,c\n1,2,3\n4,5\n", "meta.csv");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(), "meta.csv:3: expected 3 fields (as the header), got 2");
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
  EXPECT_EQ(c.status().message(), "m.csv: missing column 'filename' (columns: x,y)");
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
            "m.csv: missing column 'notes' (columns: rating,filename,notes,primary_label,x)");
  auto ragged = CsvTable::Parse("a,b,c\n1,2,3\n4,5\n", "r.csv", &columns);
  ASSERT_FALSE(ragged.ok());
  EXPECT_EQ(ragged.status().message(), "r.csv:3: expected 3 fields (as the header), got 2");
  auto quote = CsvTable::Parse("a,b\n1,x\"y\n", "q.csv", &columns);
  ASSERT_FALSE(quote.ok());
  EXPECT_NE(quote.status().message().find("q.csv:2: quote inside an unquoted field 'x\"'"), std::string::npos)
      << quote.status();
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
}

}  // namespace
}  // namespace aviary::common
