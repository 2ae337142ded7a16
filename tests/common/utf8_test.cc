#include "common/utf8.h"

#include <string>

#include "gtest/gtest.h"

namespace aviary::common {
namespace {

TEST(Utf8Test, ValidTextComesBackUnchanged) {
  const std::string text = "Blyth's reed warbler \xE2\x80\x94 Rohrs\xC3\xA4nger \xF0\x9F\x90\xA6\ttab";
  EXPECT_EQ(ValidUtf8(text), text);
  EXPECT_EQ(ValidUtf8(""), "");
}

TEST(Utf8Test, EachByteThatStartsNoWellFormedSequenceBecomesTheReplacementCharacter) {
  const std::string r = "\xEF\xBF\xBD";
  // Latin-1 (a file name of another encoding), a stray continuation byte, a truncated sequence.
  EXPECT_EQ(ValidUtf8("Rohrs\xE4nger.ogg"), "Rohrs" + r + "nger.ogg");
  EXPECT_EQ(ValidUtf8("a\x80z"), "a" + r + "z");
  EXPECT_EQ(ValidUtf8("end \xE2\x80"), "end " + r + r);
  // Overlong forms, a surrogate (U+D800) and a code point past U+10FFFF are not UTF-8 either.
  EXPECT_EQ(ValidUtf8("\xC0\xAF"), r + r);
  EXPECT_EQ(ValidUtf8("\xE0\x80\xAF"), r + r + r);
  EXPECT_EQ(ValidUtf8("\xED\xA0\x80"), r + r + r);
  EXPECT_EQ(ValidUtf8("\xF4\x90\x80\x80"), r + r + r + r);
  EXPECT_EQ(Utf8SequenceLength("\xF4\x8F\xBF\xBF", 0), 4u);  // U+10FFFF itself is fine
  EXPECT_EQ(FirstInvalidUtf8("Rohrs\xC3\xA4nger"), absl::string_view::npos);
  EXPECT_EQ(FirstInvalidUtf8("Rohrs\xE4nger"), 5u);
  EXPECT_EQ(FirstInvalidUtf8(""), absl::string_view::npos);
}

TEST(Utf8Test, APrefixNeverEndsInsideACharacter) {
  const std::string text = "ab\xC3\xA4\xE2\x80\x94";  // a b, a 2-byte and a 3-byte character
  EXPECT_EQ(Utf8Prefix(text, 100), text);
  EXPECT_EQ(Utf8Prefix(text, 2), "ab");
  EXPECT_EQ(Utf8Prefix(text, 3), "ab");
  EXPECT_EQ(Utf8Prefix(text, 4), "ab\xC3\xA4");
  EXPECT_EQ(Utf8Prefix(text, 6), "ab\xC3\xA4");
  EXPECT_EQ(Utf8Prefix(text, 0), "");
  // Not UTF-8 at all: backs over at most three continuation bytes, never to nothing.
  EXPECT_EQ(Utf8Prefix(std::string(100, '\x80'), 50).size(), 47u);
}

}  // namespace
}  // namespace aviary::common
