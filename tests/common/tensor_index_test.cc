// common/tensor_index (hand-built safetensors files and torch.save zip archives, corrupt and
// truncated ones included) and common/backbone_fit's rule. Files written by Python's torch are
// checked by tests/parity/check_tensor_index.py.
#include "common/tensor_index.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/backbone_fit.h"
#include "common/files.h"
#include "common/model_shapes.h"
#include "gtest/gtest.h"

namespace aviary::common {
namespace {

namespace fs = std::filesystem;

std::string Le(uint64_t v, int n) {
  std::string s;
  for (int k = 0; k < n; ++k) s.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
  return s;
}

struct Entry {
  std::string name;
  std::string data;
  uint16_t method = 0;
};

// A zip archive of stored entries (CRCs are not checked by the reader and left 0); with `zip64`
// the end records are the zip64 ones (the classic record's fields set to 0xFFFF...).
std::string Zip(const std::vector<Entry>& entries, bool zip64 = false) {
  std::string out, cd;
  for (const Entry& e : entries) {
    const uint64_t offset = out.size();
    out += Le(0x04034b50, 4) + Le(20, 2) + Le(0, 2) + Le(e.method, 2) + Le(0, 4) + Le(0, 4) +
           Le(e.data.size(), 4) + Le(e.data.size(), 4) + Le(e.name.size(), 2) + Le(0, 2) + e.name + e.data;
    cd += Le(0x02014b50, 4) + Le(20, 2) + Le(20, 2) + Le(0, 2) + Le(e.method, 2) + Le(0, 4) + Le(0, 4) +
          Le(e.data.size(), 4) + Le(e.data.size(), 4) + Le(e.name.size(), 2) + Le(0, 2) + Le(0, 2) + Le(0, 2) +
          Le(0, 2) + Le(0, 4) + Le(offset, 4) + e.name;
  }
  const uint64_t cd_offset = out.size();
  out += cd;
  if (zip64) {
    const uint64_t record = out.size();
    out += Le(0x06064b50, 4) + Le(44, 8) + Le(45, 2) + Le(45, 2) + Le(0, 4) + Le(0, 4) + Le(entries.size(), 8) +
           Le(entries.size(), 8) + Le(cd.size(), 8) + Le(cd_offset, 8);
    out += Le(0x07064b50, 4) + Le(0, 4) + Le(record, 8) + Le(1, 4);
    out += Le(0x06054b50, 4) + Le(0, 4) + Le(0xFFFF, 2) + Le(0xFFFF, 2) + Le(0xFFFFFFFF, 4) + Le(0xFFFFFFFF, 4) +
           Le(0, 2);
  } else {
    out += Le(0x06054b50, 4) + Le(0, 4) + Le(entries.size(), 2) + Le(entries.size(), 2) + Le(cd.size(), 4) +
           Le(cd_offset, 4) + Le(0, 2);
  }
  return out;
}

// Pickle protocol 2 as torch.save writes it.
std::string Str(const std::string& s) { return "X" + Le(s.size(), 4) + s; }
std::string Global(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
// _rebuild_tensor_v2(persistent_id(('storage', FloatStorage, key, 'cpu', numel)), 0, size, stride, False, OrderedDict()).
std::string Tensor(const std::string& key, int numel, const std::vector<int>& size, const std::vector<int>& stride) {
  std::string s = Global("torch._utils", "_rebuild_tensor_v2") + "((" + Str("storage") +
                  Global("torch", "FloatStorage") + Str(key) + Str("cpu") + "K" + Le(numel, 1) + "tQK" + Le(0, 1) + "(";
  for (int d : size) s += "K" + Le(d, 1);
  s += "t(";
  for (int d : stride) s += "K" + Le(d, 1);
  s += "t\x89" + Global("collections", "OrderedDict") + ")Rtr" + Le(0, 4) + "R";
  return s;
}
std::string OrderedDict(const std::vector<std::pair<std::string, std::string>>& items) {
  std::string s = Global("collections", "OrderedDict") + ")Rq" + Le(1, 1) + "(";
  for (const auto& [k, v] : items) s += Str(k) + v;
  return s + "u";
}
std::string Pickle(const std::string& body) { return "\x80\x02" + body + "."; }

class TensorIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = absl::StrCat(::testing::TempDir(), "aviary_tensor_index_XXXXXX");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Put(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    EXPECT_TRUE(WriteFileAtomically(path, bytes).ok());
    return path;
  }
  // The index of `bytes`, or the error's message.
  std::string Read(const std::string& bytes, TensorIndex* index = nullptr) {
    auto got = ReadTensorIndex(Put("f", bytes));
    if (!got.ok()) return std::string(got.status().message());
    if (index != nullptr) *index = *got;
    return "ok";
  }
  std::string dir_;
};

TEST_F(TensorIndexTest, ReadsTorchSaveArchivesWithNestedDictsAndZip64) {
  const std::string pickle = Pickle(
      "}(" + Str("model") +
      OrderedDict({{"features.0.weight", Tensor("0", 6, {2, 3}, {3, 1})}, {"bias", Tensor("1", 3, {3}, {1})}}) +
      Str("epoch") + "K" + Le(7, 1) + Str("step") + "\x8a\x02" + Le(0xfff0, 2) + "u");
  const std::vector<Entry> entries{{"archive/data.pkl", pickle},
                                   {"archive/data/0", std::string(24, '\0')},
                                   {"archive/data/1", std::string(12, '\0')},
                                   {"archive/version", "3\n"}};
  for (bool zip64 : {false, true}) {
    TensorIndex index;
    ASSERT_EQ(Read(Zip(entries, zip64), &index), "ok") << zip64;
    const TensorIndex want{{"model.features.0.weight", "F32", {2, 3}}, {"model.bias", "F32", {3}}};
    EXPECT_TRUE(index == want) << zip64;
  }
}

// {"a": {"b": t}} beside "a.b": both flatten to "a.b", and which one a model got was the
// order's accident (the last won). The same for a key pickled twice into one dict.
TEST_F(TensorIndexTest, TensorsThatFlattenToOneNameAreAnErrorNamingTheFileAndTheName) {
  const std::string data(24, '\0');
  const std::string path = dir_ + "/f";
  const std::string nested = Pickle("}(" + Str("a") + OrderedDict({{"b", Tensor("0", 6, {2, 3}, {3, 1})}}) +
                                    Str("a.b") + Tensor("1", 6, {3, 2}, {2, 1}) + "u");
  const std::string got = Read(Zip({{"a/data.pkl", nested}, {"a/data/0", data}, {"a/data/1", data}}));
  EXPECT_TRUE(absl::StartsWith(got, path)) << got;
  EXPECT_TRUE(absl::StrContains(got, "two tensors are named 'a.b'")) << got;
  // A key set twice in one mapping, the second time to a tensor or to a number (torch.load keeps
  // the number: the tensor was read here all the same).
  const std::string twice = Pickle(OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})}, {"w", Tensor("1", 6, {6}, {1})}}));
  const std::string then_number = Pickle("}(" + Str("w") + Tensor("0", 6, {2, 3}, {3, 1}) + Str("w") + "K" + Le(5, 1) + "u");
  for (const std::string& pickle : {twice, then_number}) {
    const std::string again = Read(Zip({{"a/data.pkl", pickle}, {"a/data/0", data}, {"a/data/1", data}}));
    EXPECT_TRUE(absl::StartsWith(again, path)) << again;
    EXPECT_TRUE(absl::StrContains(again, "the key 'w' is set twice in one mapping")) << again;
  }
  // Distinct names in nested and dotted form still read.
  const std::string distinct = Pickle("}(" + Str("a") + OrderedDict({{"b", Tensor("0", 6, {2, 3}, {3, 1})}}) +
                                      Str("a.c") + Tensor("1", 6, {6}, {1}) + "u");
  TensorIndex index;
  ASSERT_EQ(Read(Zip({{"a/data.pkl", distinct}, {"a/data/0", data}, {"a/data/1", data}}), &index), "ok");
  ASSERT_EQ(index.size(), 2u);
  EXPECT_EQ(index[0].name, "a.b");
  EXPECT_EQ(index[1].name, "a.c");
}

TEST_F(TensorIndexTest, CorruptArchivesAreClearErrors) {
  const std::string good = Pickle(OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})}}));
  const std::string data(24, '\0');
  const std::string path = dir_ + "/f";
  struct Case {
    std::string bytes;
    std::string expect;
  };
  const std::string zip = Zip({{"a/data.pkl", good}, {"a/data/0", data}});
  const std::vector<Case> cases{
      {zip.substr(0, zip.size() - 30), "no zip end record"},
      {zip.substr(0, 40), "no zip end record"},
      {Zip({{"a/data.pkl", good}, {"a/data/0", data.substr(0, 20)}}), "storage '0' claims 6 elements of F32"},
      // An empty key names the folder entry "a/data/": the worker read it as a safetensors
      // tensor, its offset and strides ignored.
      {Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", Tensor("", 6, {2, 3}, {3, 1})}}))}, {"a/data/", data}}),
       "storage key '' is empty or holds '/'"},
      {Zip({{"a/data.pkl", good}}), "storage '0' has no data record"},
      {Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", Tensor("0", 6, {4, 3}, {3, 1})}}))}, {"a/data/0", data}}),
       "reaches past its storage of 6 elements"},
      {Zip({{"a/data.pkl", good.substr(0, good.size() - 5)}, {"a/data/0", data}}), "a/data.pkl byte"},
      {Zip({{"a/data.pkl", "\x80\x02\xff."}, {"a/data/0", data}}), path + ": a/data.pkl byte 2: unsupported pickle opcode 0xff"},
      {Zip({{"a/data.pkl", Pickle(Str("x"))}}), "expected a state dict"},
      {Zip({{"a/data.pkl", good, 8}, {"a/data/0", data}}), "is compressed (method 8)"},
      {Zip({{"a/data.pkl", good}, {"a/constants.pkl", good}, {"a/data/0", data}}), "a TorchScript archive"},
      {Zip({{"a/other.pkl", good}}), "without */data.pkl"},
      {"\x80\x02}q\x00.", "shorter than a zip end record"},
      // A dict that holds itself twice under every level (2^n paths without a bound).
      {Zip({{"a/data.pkl", Pickle("}q" + Le(0, 1) + "(" + Str("x") + "h" + Le(0, 1) + Str("y") + "h" + Le(0, 1) + "u")}}), "refers to itself"},
      // A pickle of a few MB that pushes millions of values (gigabytes for a 64 MB one).
      {Zip({{"a/data.pkl", Pickle(std::string(3 << 20, '('))}}), "more than 1048576 pickle values"},
      // Tuples nested a million deep (TUPLE1 after TUPLE1): refused, and freed without
      // recursing a million frames deep (which overflowed the stack).
      {Zip({{"a/data.pkl", Pickle("N" + std::string(1000000, '\x85'))}}), "expected a state dict"},
  };
  for (const Case& c : cases) {
    const std::string got = Read(c.bytes);
    EXPECT_TRUE(absl::StrContains(got, c.expect)) << got;
    EXPECT_TRUE(absl::StartsWith(got, path)) << got;
  }
  // A central directory that claims more than the file holds.
  std::string lying = zip;
  const size_t eocd = lying.size() - 22;
  lying.replace(eocd + 12, 4, Le(1u << 30, 4));
  EXPECT_TRUE(absl::StrContains(Read(lying), "exceeds")) << Read(lying);
  lying.replace(eocd + 12, 4, Le(1u << 20, 4));
  EXPECT_TRUE(absl::StrContains(Read(lying), "truncated: the zip central directory")) << Read(lying);
}

// Sizes and strides whose products wrap around int64 (LONG1 values) must not pass the bound
// check: the view would claim 2^62 elements of a 1-element storage (the worker's clone of it
// fails to allocate and aborts).
TEST_F(TensorIndexTest, ViewsWhoseExtentOverflowsAreRefused) {
  auto tensor = [](const std::vector<uint64_t>& size, const std::vector<uint64_t>& stride) {
    auto ints = [](const std::vector<uint64_t>& v) {
      std::string s = "(";
      for (uint64_t d : v) s += "\x8a\x08" + Le(d, 8);
      return s + "t";
    };
    return Global("torch._utils", "_rebuild_tensor_v2") + "((" + Str("storage") + Global("torch", "FloatStorage") +
           Str("0") + Str("cpu") + "K" + Le(1, 1) + "tQK" + Le(0, 1) + ints(size) + ints(stride) + "\x89" +
           Global("collections", "OrderedDict") + ")RtR";
  };
  const std::string data(4, '\0');
  const std::string path = dir_ + "/f";
  // (2^62 + 1 - 1) * 4 wraps to 0: the last element would seem to be element 0.
  std::string got = Read(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", tensor({(1ull << 62) + 1}, {4})}}))},
                              {"a/data/0", data}}));
  EXPECT_TRUE(absl::StartsWith(got, path + ": a/data.pkl byte")) << got;
  EXPECT_TRUE(absl::StrContains(got, "tensor size 4611686018427387905 / stride 4")) << got;
  // Stride 0 (an expanded view) of 2^32 x 2^32 elements: in bounds, but 2^64 elements.
  got = Read(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", tensor({1ull << 32, 1ull << 32}, {0, 0})}}))},
                  {"a/data/0", data}}));
  EXPECT_TRUE(absl::StartsWith(got, path + ": a/data.pkl byte")) << got;
  EXPECT_TRUE(absl::StrContains(got, "elements")) << got;
  // Stride 0 over one element, 2^34 elements: within the view bound, but 64 GiB to make from a
  // file of a few hundred bytes.
  got = Read(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", tensor({1ull << 34}, {0})}}))}, {"a/data/0", data}}));
  EXPECT_TRUE(absl::StartsWith(got, path + ": a/data.pkl byte")) << got;
  EXPECT_TRUE(absl::StrContains(got, "expands a storage of 1 elements to 17179869184")) << got;
  // A plain expanded view of few elements still reads.
  TensorIndex index;
  ASSERT_EQ(Read(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", tensor({3, 2}, {0, 0})}}))}, {"a/data/0", data}}),
                 &index),
            "ok");
  EXPECT_TRUE(index == (TensorIndex{{"w", "F32", {3, 2}}}));
}

// Files crafted to make the reader (the coordinator, at submit) allocate, loop or read what a
// worker's torch would read otherwise (found by review): each is refused with a message naming
// the file.
TEST_F(TensorIndexTest, CraftedArchivesAreRefusedBeforeTheyCostMemory) {
  const std::string data(24, '\0');
  const std::string path = dir_ + "/f";
  const std::string good = Pickle(OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})}}));
  auto refused = [&](const std::string& bytes, const std::string& expect) {
    const std::string got = Read(bytes);
    EXPECT_TRUE(absl::StartsWith(got, path)) << got;
    EXPECT_TRUE(absl::StrContains(got, expect)) << "wanted '" << expect << "' in: " << got.substr(0, 400);
  };
  // STACK_GLOBAL of its own results doubled a string per 4 opcodes (2^40 bytes from 300).
  std::string doubling = "\x80\x02" + Str("a") + "q" + Le(0, 1);
  for (int i = 0; i < 40; ++i) doubling += "h" + Le(0, 1) + "h" + Le(0, 1) + "\x93q" + Le(0, 1);
  refused(Zip({{"a/data.pkl", doubling + "."}}), "STACK_GLOBAL of values that are not two strings");
  refused(Zip({{"a/data.pkl", Pickle(Str(std::string(300, 'm')) + Str(std::string(300, 'n')) + "\x93")}}),
          "a global name of 601 bytes");
  // One mapping of 300 tensors under 300 keys: 90,000 names from 8 KB (with 2000 each way, 4
  // million): refused at the tensor cap. One mapping under two keys still reads (as torch would
  // load it), and so does a long key of a value that is no tensor.
  std::string fan = "}(" + Str("a0") + OrderedDict({{"k0", Tensor("0", 6, {2, 3}, {3, 1}) + "q" + Le(5, 1)}});
  fan.pop_back();  // reopen the inner mapping's SETITEMS
  for (int i = 1; i < 300; ++i) fan += Str(absl::StrCat("k", i)) + "h" + Le(5, 1);
  fan += "u";
  for (int i = 1; i < 300; ++i) fan += Str(absl::StrCat("a", i)) + "h" + Le(1, 1);
  refused(Zip({{"a/data.pkl", Pickle(fan + "u")}, {"a/data/0", data}}), "holds more than 65536 tensors");
  TensorIndex twice;
  ASSERT_EQ(Read(Zip({{"a/data.pkl",
                       Pickle("}(" + Str("model") + OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})}}) + Str("ema") +
                              "h" + Le(1, 1) + Str(std::string(2000, 'n')) + "K" + Le(1, 1) + "u")},
                      {"a/data/0", data}}),
                 &twice),
            "ok");
  EXPECT_TRUE(twice == (TensorIndex{{"model.w", "F32", {2, 3}}, {"ema.w", "F32", {2, 3}}}));
  refused(Zip({{"a/data.pkl", Pickle(OrderedDict({{std::string(2000, 'k'), Tensor("0", 6, {2, 3}, {3, 1})}}))},
               {"a/data/0", data}}),
          "has a name longer than 1024 bytes");
  // A storage record whose central directory entry claims 2 GB of a file of 300 bytes.
  std::string lying = Zip({{"a/data.pkl", good}, {"a/data/0", data}});
  const size_t second_cd = lying.find("PK\x01\x02", lying.find("PK\x01\x02") + 4);
  ASSERT_NE(second_cd, std::string::npos);
  lying.replace(second_cd + 20, 8, Le(0x7FFFFFFF, 4) + Le(0x7FFFFFFF, 4));
  refused(lying, "zip entry a/data/0 claims 2147483647 bytes");
  // Two entries of one name, two pickles: torch's reader and this one would take different ones.
  refused(Zip({{"a/data.pkl", good}, {"a/data/0", data}, {"a/data/0", data}}), "two entries are named 'a/data/0'");
  refused(Zip({{"a/data.pkl", good}, {"b/data.pkl", good}, {"a/data/0", data}}), "two pickles");
  // One storage named with two sizes; a big-endian file.
  refused(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})}, {"v", Tensor("0", 3, {3}, {1})}}))},
               {"a/data/0", data}}),
          "storage '0' is named with 6 elements of F32 and with 3 of F32");
  refused(Zip({{"a/data.pkl", good}, {"a/data/0", data}, {"a/byteorder", "big"}}), "'big'-endian");
  EXPECT_EQ(Read(Zip({{"a/data.pkl", good}, {"a/data/0", data}, {"a/byteorder", "little"}})), "ok");
  // 300 expanded views of one element, each under the per-view cap, 19.5 million together.
  std::vector<std::pair<std::string, std::string>> views;
  for (int i = 0; i < 300; ++i) views.emplace_back(absl::StrCat("w", i), Tensor("0", 1, {255, 255}, {0, 0}));
  refused(Zip({{"a/data.pkl", Pickle(OrderedDict(views))}, {"a/data/0", data}}), "tensors view 19507500 elements");
  // Two storage records sharing one stored entry's bytes (the second's directory entry points at
  // the first's local header): each key would be read, and allocated, on its own.
  std::string shared = Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", Tensor("0", 6, {2, 3}, {3, 1})},
                                                               {"v", Tensor("1", 6, {2, 3}, {3, 1})}}))},
                            {"a/data/0", data},
                            {"a/data/1", data}});
  const size_t first_record = shared.find("PK\x03\x04", 4);
  size_t third_cd = shared.find("PK\x01\x02");
  for (int k = 0; k < 2; ++k) third_cd = shared.find("PK\x01\x02", third_cd + 4);
  ASSERT_NE(third_cd, std::string::npos);
  EXPECT_EQ(Read(shared), "ok");  // as written: apart
  shared.replace(third_cd + 42, 4, Le(first_record, 4));
  refused(shared, "zip entry a/data/1 (bytes [");
  refused(shared, "overlaps zip entry a/data/0");
  // An empty view whose other sizes multiply past any tensor: nothing to read, and still a
  // stride no reader can compute.
  std::string huge = Global("torch._utils", "_rebuild_tensor_v2") + "((" + Str("storage") +
                     Global("torch", "FloatStorage") + Str("0") + Str("cpu") + "K" + Le(6, 1) + "tQK" + Le(0, 1) +
                     "(K" + Le(0, 1);
  for (int d = 0; d < 3; ++d) huge += "J" + Le(0x7FFFFFFF, 4);
  huge += "t(";
  for (int d = 0; d < 4; ++d) huge += "K" + Le(1, 1);
  huge += "t\x89" + Global("collections", "OrderedDict") + ")Rtr" + Le(0, 4) + "R";
  refused(Zip({{"a/data.pkl", Pickle(OrderedDict({{"w", huge}}))}, {"a/data/0", data}}), "elements");
}

// Random damage to a good archive and to a good safetensors file (bytes flipped, cut short):
// every read ends with an index or an error naming the file, never a crash, a hang or an
// allocation of the sizes the damage claims. Seeded: the same 3000 files on every run.
TEST_F(TensorIndexTest, DamagedFilesEndInAnIndexOrAnError) {
  const std::string pickle = Pickle(
      "}(" + Str("model") +
      OrderedDict({{"features.0.weight", Tensor("0", 6, {2, 3}, {3, 1})}, {"bias", Tensor("1", 3, {3}, {1})}}) +
      Str("epoch") + "K" + Le(7, 1) + "u");
  const std::string archive = Zip({{"archive/data.pkl", pickle},
                                   {"archive/data/0", std::string(24, '\0')},
                                   {"archive/data/1", std::string(12, '\0')},
                                   {"archive/byteorder", "little"}});
  const std::string header = R"({"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}})";
  const std::string safetensors = Le(header.size(), 8) + header + std::string(12, '\0');
  const std::string path = dir_ + "/f";
  std::mt19937 rng(20261205);
  int ok = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string bytes = i % 3 == 0 ? safetensors : archive;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      const size_t at = rng() % bytes.size();
      bytes[at] = static_cast<char>(rng() % 7 == 0 ? 0xff : rng() & 0xff);
    }
    if (rng() % 5 == 0) bytes.resize(rng() % bytes.size());
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;  // no fsync: 3000 files
    auto got = ReadTensorIndex(path);
    if (got.ok()) {
      ++ok;
    } else {
      ASSERT_TRUE(absl::StartsWith(got.status().message(), path)) << i << ": " << got.status();
    }
  }
  EXPECT_GT(ok, 0);  // some damage (a flipped data byte) leaves a readable file
}

// A FIFO under the data roots: refused as not a regular file, not waited on for a writer.
TEST_F(TensorIndexTest, AFifoIsRefusedWithoutWaiting) {
  const std::string fifo = dir_ + "/weights.pt";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto got = ReadTensorIndex(fifo);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(got.status().message(), "not a regular file")) << got.status();
}

TEST_F(TensorIndexTest, ReadsSafetensorsAndRefusesCorruptHeaders) {
  auto file = [](const std::string& header, size_t data) {
    return Le(header.size(), 8) + header + std::string(data, '\0');
  };
  TensorIndex index;
  ASSERT_EQ(Read(file(R"({"__metadata__":{"a":"b"},"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},)"
                      R"("n":{"dtype":"I64","shape":[],"data_offsets":[12,20]}})",
                      20),
                 &index),
            "ok");
  EXPECT_TRUE(index == (TensorIndex{{"w", "F16", {2, 3}}, {"n", "I64", {}}}));
  const std::string path = dir_ + "/f";
  EXPECT_EQ(Read(file(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 20)),
            path + ": not a valid safetensors file: entry 'w' has data_offsets [0, 24] that do not fit its shape "
                   "[2, 3] and F32 or the file's 20 data bytes");
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0)),
                                "has a dimension 4611686018427387904 out of range"));
  // Numbers as JSON writes them, not as YAML reads them: "010" was octal 8, a quoted "8" and
  // "0x8" were 8, where the safetensors library refuses the file.
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"U8","shape":[010],"data_offsets":[0,8]}})", 8)),
                                "has a dimension 010 that is not a JSON whole number"));
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"U8","shape":["8"],"data_offsets":[0,8]}})", 8)),
                                "has a dimension 8 that is not a JSON whole number"));
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[0,"0x8"]}})", 8)),
                                "has data_offsets that are not JSON whole numbers"));
  EXPECT_EQ(Read(file(R"({"w":{"dtype":"U8","shape":[0,8],"data_offsets":[0,0]}})", 0)), "ok");
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1)),
                                "unsupported dtype Q7"));
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":{"dtype":"F32"}})", 0)), "lacks dtype/shape/data_offsets"));
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w":[1,2}})", 0)), "header JSON"));
  // YAML that is not JSON (an anchor and an alias), and a header of too many values (yaml-cpp
  // takes ~200 bytes of each: gigabytes from 100 MB).
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"w": &a {"dtype":"F32"}, "v": *a})", 0)),
                                "'&' at byte 6 outside a string: not JSON"));
  // A '"' inside a bare word (YAML reads it as a character) must not open a string for the
  // checks: it hid the tokens and the anchors up to the next '"' from them.
  EXPECT_TRUE(absl::StrContains(Read(file(R"({"m": [x", &A [1], *A, y"], "w":{"dtype":"F32"}})", 0)),
                                "'\"' at byte 8 inside a bare word: not JSON"));
  std::string hidden = R"({"m": [x")";
  for (int i = 0; i < 270000; ++i) hidden += ",1";
  EXPECT_TRUE(absl::StrContains(Read(file(hidden + R"(, y"]})", 0)), "inside a bare word: not JSON"));
  std::string many = R"({"w":[0)";
  for (int i = 0; i < 270000; ++i) many += ",0";
  EXPECT_TRUE(absl::StrContains(Read(file(many + "]}", 0)), "more than 262144 JSON tokens"));
  // A key twice in the header (JSON parsers differ on which one they keep).
  EXPECT_EQ(Read(file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      8)),
            path + ": not a valid safetensors file: two entries are named 'w'");
  // A header length past the file's end is no safetensors file, as for the worker.
  EXPECT_TRUE(absl::StrContains(Read(Le(1u << 30, 8) + "{}"), "shorter than a zip end record"));
  // ... unless it is one a safetensors header may have: a file cut inside its header is named as
  // such (it was "not a torch.save zip archive").
  const std::string cut = file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4).substr(0, 30);
  EXPECT_EQ(Read(cut), path + ": truncated: the safetensors header at byte 8 needs 54 bytes, the file has 30");
  EXPECT_EQ(ReadTensorIndex(dir_ + "/absent").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ReadTensorIndex(dir_).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BackboneFitTest, TheRuleTheTrainerAndTheCoordinatorShare) {
  auto b0 = BackboneShapes("efficientnet_b0", 3);
  auto b1 = BackboneShapes("efficientnet_b1", 3);
  auto b0_mono = BackboneShapes("efficientnet_b0", 1);
  ASSERT_TRUE(b0.ok() && b1.ok() && b0_mono.ok());
  TensorIndex imagenet = *b0;
  imagenet.push_back({"classifier.1.weight", "F32", {1000, 1280}});
  // Its own backbone, also for one input plane (the stem stays random), with a classifier.
  EXPECT_TRUE(CompareBackbone(imagenet, *b0).ok());
  BackboneFit mono = CompareBackbone(imagenet, *b0_mono);
  EXPECT_TRUE(mono.ok()) << mono.Summary();
  EXPECT_TRUE(mono.stem_skipped);
  EXPECT_EQ(mono.fitting.size(), b0->size() - 1);
  // B1 has B0's widths and more blocks: unexpected for B0, missing for B1.
  BackboneFit deeper = CompareBackbone(*b1, *b0);
  EXPECT_FALSE(deeper.ok());
  EXPECT_TRUE(deeper.missing.empty() && deeper.mismatched.empty());
  EXPECT_FALSE(deeper.unexpected.empty());
  EXPECT_FALSE(CompareBackbone(*b0, *b1).missing.empty());
  // Nothing of the backbone (a timm file before `weights import`): refused, saying what to do.
  const absl::Status none = CheckBackboneFit(CompareBackbone({{"conv_stem.weight", "F32", {32, 3, 3, 3}}}, *b0),
                                             "/w/timm.pth", "efficientnet_b0", 3);
  EXPECT_EQ(none.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StartsWith(none.message(), "key 'model.pretrained_weights': '/w/timm.pth' does not fit model "
                                               "efficientnet_b0 (frontend.in_channels 3): 0 backbone tensors fit; "))
      << none;
  EXPECT_TRUE(absl::StrContains(none.message(), "aviary weights import --model efficientnet_b0")) << none;
  // A stem that differs in more than the channels is a mismatch; lists show 4 names then a count.
  TensorIndex wide = *b0;
  wide[0].shape = {40, 3, 3, 3};
  for (size_t i = 1; i < 7; ++i) wide[i].shape = {7};
  BackboneFit fit = CompareBackbone(wide, *b0_mono);
  EXPECT_EQ(fit.mismatched.size(), 7u);
  EXPECT_TRUE(absl::StrContains(fit.Summary(), "7 mismatched: features.0.0.weight: file [40, 3, 3, 3] vs model "
                                               "[32, 1, 3, 3], "))
      << fit.Summary();
  EXPECT_TRUE(absl::StrContains(fit.Summary(), ", ... (3 more)")) << fit.Summary();
  // Integer values for float weights (a quantized file) are a mismatch, not a cast.
  TensorIndex quantized = *b0;
  quantized[3].dtype = "I8";
  BackboneFit codes = CompareBackbone(quantized, *b0);
  EXPECT_FALSE(codes.ok());
  ASSERT_EQ(codes.mismatched.size(), 1u);
  EXPECT_EQ(codes.mismatched[0], absl::StrCat(quantized[3].name, ": file I8 values vs model F32"));
  TensorIndex halves = *b0;
  for (TensorEntry& e : halves) {
    if (e.dtype == "F32") e.dtype = "F16";
  }
  EXPECT_TRUE(CompareBackbone(halves, *b0).ok());
}

}  // namespace
}  // namespace aviary::common
