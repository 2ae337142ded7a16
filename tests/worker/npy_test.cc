#include "worker/tools/npy.h"

#include <cstdio>
#include <string>
#include <vector>

#include "common/csv.h"
#include "common/files.h"
#include "gtest/gtest.h"

namespace aviary::worker {

using common::WriteFileAtomically;
namespace {

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/npy_test_" + name;
}

TEST(NpyTest, HeaderIsNumpysForTheModelInput) {
  auto header = NpyHeader({3, 128, 384});
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->size() % 64, 0u);
  EXPECT_EQ(header->substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t len = static_cast<unsigned char>((*header)[8]) |
                     (static_cast<unsigned char>((*header)[9]) << 8);
  EXPECT_EQ(len + 10, header->size());
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 128, 384), }";
  EXPECT_EQ(header->substr(10, dict.size()), dict);
  // numpy's spare room for growing axis 0 (21 - 1 digits), then padding, then '\n'.
  EXPECT_EQ(header->substr(10 + dict.size()), std::string(header->size() - 11 - dict.size(), ' ') + "\n");
}

TEST(NpyTest, ShapeReprMatchesPythonTuples) {
  auto one = NpyHeader({5});
  ASSERT_TRUE(one.ok());
  EXPECT_NE(one->find("'shape': (5,), }"), std::string::npos);
  auto scalar = NpyHeader({});
  ASSERT_TRUE(scalar.ok());
  EXPECT_NE(scalar->find("'shape': (), }"), std::string::npos);
  EXPECT_EQ(scalar->size(), 128u) << "no growth padding for 0-d: 66 bytes, padded to 128";
  EXPECT_FALSE(NpyHeader({2, -1}).ok());
}

TEST(NpyTest, RoundTrip) {
  const std::string path = TempPath("round_trip.npy");
  std::vector<float> data(2 * 3 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i) * 0.5f - 1.0f;
  ASSERT_TRUE(WriteNpy(path, {2, 3, 4}, data).ok());
  auto back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->shape, (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(back->data, data);
  std::remove(path.c_str());
}

TEST(NpyTest, RoundTripEmptyAndScalar) {
  const std::string path = TempPath("empty.npy");
  ASSERT_TRUE(WriteNpy(path, {0, 7}, std::vector<float>{}).ok());
  auto empty = ReadNpy(path);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->shape, (std::vector<int64_t>{0, 7}));
  EXPECT_TRUE(empty->data.empty());
  ASSERT_TRUE(WriteNpy(path, {}, std::vector<float>{4.5f}).ok());
  auto scalar = ReadNpy(path);
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_TRUE(scalar->shape.empty());
  EXPECT_EQ(scalar->data, std::vector<float>{4.5f});
  std::remove(path.c_str());
}

TEST(NpyTest, RefusesMismatchedDataAndBadFiles) {
  const std::string path = TempPath("bad.npy");
  absl::Status st = WriteNpy(path, {2, 2}, std::vector<float>(3));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("holds 4 values, got 3"), std::string::npos) << st;

  EXPECT_EQ(ReadNpy(TempPath("missing.npy")).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(WriteFileAtomically(path, "hello").ok());
  EXPECT_EQ(ReadNpy(path).status().code(), absl::StatusCode::kInvalidArgument);

  auto header = NpyHeader({4});
  ASSERT_TRUE(header.ok());
  ASSERT_TRUE(WriteFileAtomically(path, *header + std::string(8, '\0')).ok());  // 2 of 4 floats
  auto truncated = ReadNpy(path);
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(truncated.status().message().find("needs 16 data bytes, file has 8"), std::string::npos)
      << truncated.status();

  // A shape whose product wraps around size_t (to 0 here) is refused, not read as empty.
  std::string huge = *header;
  huge.replace(huge.find("(4,)"), 4, "(4611686018427387904, 4)");
  huge.erase(huge.find_last_not_of(" \n") + 1, 20);  // the same header length: 20 spaces of its padding fewer
  ASSERT_TRUE(WriteFileAtomically(path, huge).ok());
  auto wrapped = ReadNpy(path);
  EXPECT_EQ(wrapped.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrapped.status().message().find("is too large"), std::string::npos) << wrapped.status();

  std::string f8 = *header;
  f8.replace(f8.find("'<f4'"), 5, "'<f8'");
  ASSERT_TRUE(WriteFileAtomically(path, f8 + std::string(32, '\0')).ok());
  auto wrong_dtype = ReadNpy(path);
  EXPECT_NE(wrong_dtype.status().message().find("dtype '<f8'"), std::string::npos)
      << wrong_dtype.status();
  std::remove(path.c_str());
}

}  // namespace
}  // namespace aviary::worker
