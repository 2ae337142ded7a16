#include "common/tensor_index.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "yaml-cpp/yaml.h"

namespace aviary::common {
namespace {

// A JSON whole number as a plain YAML scalar: decimal digits without a leading zero (yaml-cpp's
// as<> reads "010" as octal 8, "0x10" as 16, and a quoted "8" as 8: the safetensors library
// refuses all three).
std::optional<uint64_t> JsonCount(const YAML::Node& node) {
  if (!node.IsScalar() || node.Tag() != "?") return std::nullopt;
  const std::string& text = node.Scalar();
  if (text.empty() || text.size() > 20 || (text.size() > 1 && text[0] == '0')) return std::nullopt;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  uint64_t value = 0;
  if (!absl::SimpleAtoi(text, &value)) return std::nullopt;
  return value;
}

std::string DescribeNode(const YAML::Node& node) {
  return node.IsScalar() ? node.Scalar() : node.IsSequence() ? "a list" : node.IsMap() ? "a map" : "nothing";
}

// Caps on what a header may claim (far above real files: a B3 state dict's pickle is ~60 KB, its
// safetensors header ~40 KB). The coordinator reads files users name at submit: every cap bounds
// what a crafted file can make it allocate or do.
constexpr uint64_t kMaxSafetensorsHeader = 16 << 20;  // safetensors allows 100 MB; yaml-cpp takes ~50x
// JSON tokens ({ [ , :) in a safetensors header: yaml-cpp makes a node of ~200 bytes of each.
// An entry takes about 17: some 15,000 tensors (a CNN backbone has about 500).
constexpr int64_t kMaxHeaderTokens = int64_t{1} << 18;
constexpr uint64_t kMaxCentralDirectory = 64 << 20;
constexpr uint64_t kMaxPickle = 64 << 20;
// Values a pickle may push or memoize: a state dict takes about 25 a tensor (40,000 tensors fit),
// and a crafted one of 64 MB of pushes would otherwise take gigabytes (the coordinator reads
// model.pretrained_weights at submit).
constexpr int64_t kMaxPickleValues = int64_t{1} << 20;
// A view's elements beyond its storage's (stride 0): a broadcast bias, not gigabytes.
constexpr int64_t kMaxExpandedElements = int64_t{1} << 24;
constexpr int kMaxRank = 16;
// Tensors in one file, bytes of one tensor name (nested keys joined with '.'), of a storage key,
// of a global's "module.name".
constexpr int64_t kMaxTensors = int64_t{1} << 16;
constexpr size_t kMaxNameBytes = 1024;
// Mapping entries visited while flattening (a mapping reached through several keys is visited
// each time).
constexpr int64_t kMaxFlattenEntries = int64_t{1} << 22;
constexpr size_t kMaxStorageKeyBytes = 256;
constexpr size_t kMaxGlobalBytes = 512;
// All views together may make at most this many elements beyond 4 x their storages' (tied
// weights view one storage twice): the worker materialises every view.
constexpr int64_t kMaxTotalExtraElements = int64_t{1} << 24;

// Text from the file in a message: at most 200 bytes of it.
std::string Shown(const std::string& text) {
  return text.size() <= 200 ? text : absl::StrCat(text.substr(0, 200), "... (", text.size(), " bytes)");
}
// A tensor view's elements (stride 0 lets a small storage claim any number; the worker
// materialises each view).
constexpr int64_t kMaxViewElements = int64_t{1} << 40;

// Element sizes of the dtypes both formats name.
int64_t ElementSize(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes{
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

// A read-only file read by offset (pread); lengths are checked against its size.
class File {
 public:
  static absl::StatusOr<std::unique_ptr<File>> Open(const std::string& path) {
    // O_NONBLOCK: opening a FIFO would wait for a writer (a submit's thread, for ever); only a
    // regular file is read, and for one the flag changes nothing.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      const int err = errno;
      const std::string message = absl::StrCat(path, ": ", std::strerror(err));
      if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(message);
      if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
      return absl::InvalidArgumentError(message);
    }
    std::unique_ptr<File> file(new File(fd, path));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    file->size_ = static_cast<uint64_t>(st.st_size);
    return file;
  }
  ~File() { ::close(fd_); }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint64_t size() const { return size_; }
  // `n` bytes at `offset`; INVALID_ARGUMENT naming `what` when they lie past the end.
  absl::StatusOr<std::string> Read(uint64_t offset, uint64_t n, const std::string& what) const {
    if (offset > size_ || n > size_ - offset) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": truncated: ", what, " at byte ", offset,
                                                     " needs ", n, " bytes, the file has ", size_));
    }
    std::string out(n, '\0');
    uint64_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd_, out.data() + done, n - done, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(path_, ": read of ", what, " at byte ", offset,
                                                       " failed: ", got < 0 ? std::strerror(errno) : "end of file"));
      }
      done += static_cast<uint64_t>(got);
    }
    return out;
  }

 private:
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
  uint64_t size_ = 0;
};

uint64_t Le(const std::string& bytes, size_t at, size_t n) {
  uint64_t v = 0;
  for (size_t k = 0; k < n; ++k) v |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[at + k])) << (8 * k);
  return v;
}

// ---------------------------------------------------------------------------------------------
// safetensors.

// The header must be plain JSON of at most kMaxHeaderTokens structural tokens before yaml-cpp
// (which reads YAML: anchors, aliases and tags are not JSON) builds its nodes; empty when it is.
std::string CheckJsonHeader(const std::string& json) {
  int64_t tokens = 0;
  bool in_string = false;
  char before = '{';  // the last character outside a string and not blank (as at the start)
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
        before = '"';
      }
      continue;
    }
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '"') before = c;
    switch (c) {
      case '"':
        // A string starts a value or a key; to YAML a '"' inside a bare word is a character, and
        // taken for a string's start here it hid everything up to the next '"' from these
        // checks (a 16 MB header of 4 GB of nodes; anchors and aliases).
        if (before != '{' && before != '[' && before != ',' && before != ':') {
          return absl::StrCat("'\"' at byte ", i, " inside a bare word: not JSON");
        }
        in_string = true;
        break;
      case '{': case '[': case ',': case ':':
        if (++tokens > kMaxHeaderTokens) return absl::StrCat("more than ", kMaxHeaderTokens, " JSON tokens");
        break;
      case '&': case '*': case '!': case '|': case '>': case '%': case '@': case '`': case '#': case '\'':
        return absl::StrCat("'", std::string(1, c), "' at byte ", i, " outside a string: not JSON");
      default: break;
    }
  }
  return "";
}

// Bytes of a file that one tensor or record claims.
struct ByteRange {
  uint64_t begin = 0;
  uint64_t size = 0;
  std::string what;
};

// "" when the non-empty ranges are disjoint; else names two that overlap.
std::string Overlap(std::vector<ByteRange> ranges) {
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const ByteRange& r) { return r.size == 0; }),
               ranges.end());
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  const ByteRange* reach = nullptr;  // of the ranges so far, the one that ends last
  for (const ByteRange& r : ranges) {
    if (reach != nullptr && r.begin < reach->begin + reach->size) {
      return absl::StrCat(r.what, " (bytes [", r.begin, ", ", r.begin + r.size, ")) overlaps ", reach->what,
                          " (bytes [", reach->begin, ", ", reach->begin + reach->size,
                          ")): each byte holds one tensor's values");
    }
    if (reach == nullptr || r.begin + r.size > reach->begin + reach->size) reach = &r;
  }
  return "";
}

absl::StatusOr<TensorIndex> ReadSafetensorsIndex(const File& file, const std::string& path) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a valid safetensors file: ", why));
  };
  absl::StatusOr<std::string> head = file.Read(0, 8, "the safetensors header length");
  if (!head.ok()) return head.status();
  const uint64_t header_len = Le(*head, 0, 8);
  if (header_len > kMaxSafetensorsHeader) {
    return bad(absl::StrCat("header length ", header_len, " exceeds ", kMaxSafetensorsHeader));
  }
  absl::StatusOr<std::string> json = file.Read(8, header_len, "the safetensors header");
  if (!json.ok()) return json.status();
  if (const std::string why = CheckJsonHeader(*json); !why.empty()) return bad(absl::StrCat("header: ", why));
  const uint64_t data_bytes = file.size() - 8 - header_len;
  YAML::Node header;
  try {
    header = YAML::Load(*json);
  } catch (const YAML::Exception& e) {
    return bad(absl::StrCat("header JSON: ", e.msg));
  }
  if (!header.IsMap()) return bad("header is not a JSON object");
  TensorIndex out;
  std::set<std::string> names;
  std::vector<ByteRange> ranges;
  try {
    for (const auto& kv : header) {
      TensorEntry entry;
      entry.name = kv.first.as<std::string>();
      if (entry.name == "__metadata__") continue;
      if (entry.name.size() > kMaxNameBytes) {
        return bad(absl::StrCat("an entry's name '", Shown(entry.name), "' is longer than ", kMaxNameBytes, " bytes"));
      }
      if (!names.insert(entry.name).second) return bad(absl::StrCat("two entries are named '", entry.name, "'"));
      const YAML::Node& info = kv.second;
      if (!info.IsMap() || !info["dtype"] || !info["shape"] || !info["data_offsets"] ||
          !info["shape"].IsSequence() || !info["data_offsets"].IsSequence() ||
          info["data_offsets"].size() != 2) {
        return bad(absl::StrCat("entry '", entry.name, "' lacks dtype/shape/data_offsets"));
      }
      entry.dtype = info["dtype"].as<std::string>();
      const int64_t element = ElementSize(entry.dtype);
      if (element == 0) return bad(absl::StrCat("entry '", entry.name, "' has unsupported dtype ", Shown(entry.dtype)));
      if (info["shape"].size() > kMaxRank) return bad(absl::StrCat("entry '", entry.name, "' has rank > ", kMaxRank));
      // The product of the non-zero dimensions is bounded too: [0, 2^62, 2^62] holds nothing,
      // and still overflows a reader's strides.
      uint64_t bytes = static_cast<uint64_t>(element);
      uint64_t extent = bytes;
      for (const auto& d : info["shape"]) {
        const std::optional<uint64_t> count = JsonCount(d);
        if (!count.has_value()) {
          return bad(absl::StrCat("entry '", entry.name, "' has a dimension ", Shown(DescribeNode(d)),
                                  " that is not a JSON whole number"));
        }
        const int64_t dim = *count > (uint64_t{1} << 62) ? -1 : static_cast<int64_t>(*count);
        if (dim < 0) return bad(absl::StrCat("entry '", entry.name, "' has a dimension ", *count, " out of range"));
        if (dim > 0 && extent > (uint64_t{1} << 62) / static_cast<uint64_t>(dim)) {
          return bad(absl::StrCat("entry '", entry.name, "' has a dimension ", dim, " out of range"));
        }
        if (dim > 0) extent *= static_cast<uint64_t>(dim);
        bytes *= static_cast<uint64_t>(dim);
        entry.shape.push_back(dim);
      }
      const std::optional<uint64_t> first = JsonCount(info["data_offsets"][0]);
      const std::optional<uint64_t> last = JsonCount(info["data_offsets"][1]);
      if (!first.has_value() || !last.has_value()) {
        return bad(absl::StrCat("entry '", entry.name, "' has data_offsets that are not JSON whole numbers"));
      }
      const uint64_t begin = *first;
      const uint64_t end = *last;
      if (end < begin || end - begin != bytes || end > data_bytes) {
        return bad(absl::StrCat("entry '", entry.name, "' has data_offsets [", begin, ", ", end,
                                "] that do not fit its shape ", ShapeText(entry.shape), " and ", entry.dtype,
                                " or the file's ", data_bytes, " data bytes"));
      }
      entry.data_offset = 8 + header_len + begin;
      ranges.push_back({begin, bytes, absl::StrCat("entry '", entry.name, "'")});
      out.push_back(std::move(entry));
    }
  } catch (const YAML::Exception& e) {
    return bad(absl::StrCat("header JSON: ", e.msg));
  }
  // Each byte belongs to one tensor (as the format says): entries aliasing one range would make
  // a reader copy a file's bytes once per entry.
  if (const std::string why = Overlap(std::move(ranges)); !why.empty()) return bad(why);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Zip archives (stored entries, zip64 where sizes or offsets need it).

struct ZipEntry {
  uint16_t method = 0;
  uint64_t size = 0;          // uncompressed
  uint64_t compressed = 0;
  uint64_t local_offset = 0;  // of the local file header
};

absl::StatusOr<std::map<std::string, ZipEntry>> ReadZipDirectory(const File& file, const std::string& path) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a torch.save zip archive: ", why));
  };
  // The end-of-central-directory record: 22 bytes and a comment of up to 65535.
  if (file.size() < 22) return bad("shorter than a zip end record");
  const uint64_t tail_len = std::min<uint64_t>(file.size(), 22 + 65535);
  absl::StatusOr<std::string> tail = file.Read(file.size() - tail_len, tail_len, "the zip end record");
  if (!tail.ok()) return tail.status();
  size_t eocd = std::string::npos;
  for (size_t i = tail_len - 22 + 1; i-- > 0;) {
    if (Le(*tail, i, 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd == std::string::npos) {
    return bad("no zip end record (a truncated file, or a legacy torch.save from PyTorch < 1.6: re-save it)");
  }
  const uint64_t eocd_offset = file.size() - tail_len + eocd;
  uint64_t count = Le(*tail, eocd + 10, 2);
  uint64_t cd_size = Le(*tail, eocd + 12, 4);
  uint64_t cd_offset = Le(*tail, eocd + 16, 4);
  if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    if (eocd_offset < 20) return bad("zip64 end locator missing");
    absl::StatusOr<std::string> locator = file.Read(eocd_offset - 20, 20, "the zip64 end locator");
    if (!locator.ok()) return locator.status();
    if (Le(*locator, 0, 4) != 0x07064b50) return bad("zip64 end locator missing");
    absl::StatusOr<std::string> record = file.Read(Le(*locator, 8, 8), 56, "the zip64 end record");
    if (!record.ok()) return record.status();
    if (Le(*record, 0, 4) != 0x06064b50) return bad("bad zip64 end record signature");
    count = Le(*record, 32, 8);
    cd_size = Le(*record, 40, 8);
    cd_offset = Le(*record, 48, 8);
  }
  if (cd_size > kMaxCentralDirectory) {
    return bad(absl::StrCat("central directory of ", cd_size, " bytes exceeds ", kMaxCentralDirectory));
  }
  absl::StatusOr<std::string> cd = file.Read(cd_offset, cd_size, "the zip central directory");
  if (!cd.ok()) return cd.status();
  std::map<std::string, ZipEntry> entries;
  size_t at = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (at + 46 > cd->size() || Le(*cd, at, 4) != 0x02014b50) {
      return bad(absl::StrCat("bad central directory entry ", i, " at byte ", cd_offset + at));
    }
    ZipEntry entry;
    entry.method = static_cast<uint16_t>(Le(*cd, at + 10, 2));
    entry.compressed = Le(*cd, at + 20, 4);
    const uint64_t compressed = entry.compressed;
    entry.size = Le(*cd, at + 24, 4);
    const size_t name_len = Le(*cd, at + 28, 2);
    const size_t extra_len = Le(*cd, at + 30, 2);
    const size_t comment_len = Le(*cd, at + 32, 2);
    entry.local_offset = Le(*cd, at + 42, 4);
    if (at + 46 + name_len + extra_len + comment_len > cd->size()) {
      return bad(absl::StrCat("central directory entry ", i, " runs past the directory"));
    }
    std::string name = cd->substr(at + 46, name_len);
    // Zip64 extra field: the 64-bit values of the fields set to 0xFFFFFFFF, in this order.
    for (size_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = Le(*cd, x, 2);
      const size_t len = Le(*cd, x + 2, 2);
      size_t v = x + 4;
      const size_t end = std::min(x + 4 + len, at + 46 + name_len + extra_len);
      if (id == 0x0001) {
        if (entry.size == 0xFFFFFFFF && v + 8 <= end) entry.size = Le(*cd, v, 8), v += 8;
        if (compressed == 0xFFFFFFFF && v + 8 <= end) entry.compressed = Le(*cd, v, 8), v += 8;
        if (entry.local_offset == 0xFFFFFFFF && v + 8 <= end) entry.local_offset = Le(*cd, v, 8);
      }
      x += 4 + len;
    }
    at += 46 + name_len + extra_len + comment_len;
    // Two entries of one name: which one a reader takes differs (torch's takes another than
    // "the last"), so what the coordinator checks would not be what the worker loads.
    if (!entries.emplace(name, entry).second) {
      return bad(absl::StrCat("two entries are named '", Shown(name), "'"));
    }
  }
  return entries;
}

// Where a stored entry's bytes lie, checked against the file: its local header, stored (not
// compressed), and the data within the file. The central directory's sizes alone could claim
// terabytes for a record of a 1 KB file.
absl::StatusOr<uint64_t> ZipEntryData(const File& file, const std::string& path, const std::string& name,
                                      const ZipEntry& entry) {
  if (entry.method != 0 || entry.compressed != entry.size) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": zip entry ", Shown(name), " is compressed (method ",
                                                   entry.method, "); torch.save stores its entries uncompressed"));
  }
  absl::StatusOr<std::string> local = file.Read(entry.local_offset, 30, absl::StrCat("the zip header of ", Shown(name)));
  if (!local.ok()) return local.status();
  if (Le(*local, 0, 4) != 0x04034b50) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": bad zip header of ", Shown(name), " at byte ", entry.local_offset));
  }
  const uint64_t data = entry.local_offset + 30 + Le(*local, 26, 2) + Le(*local, 28, 2);
  if (data > file.size() || entry.size > file.size() - data) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": zip entry ", Shown(name), " claims ", entry.size,
                                                   " bytes at byte ", data, "; the file has ", file.size()));
  }
  return data;
}

// The bytes of a stored entry, at most `cap` of them.
absl::StatusOr<std::string> ReadZipEntry(const File& file, const std::string& path, const std::string& name,
                                         const ZipEntry& entry, uint64_t cap) {
  if (entry.size > cap) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": zip entry ", Shown(name), " has ", entry.size,
                                                   " bytes, more than the ", cap, " read"));
  }
  absl::StatusOr<uint64_t> data = ZipEntryData(file, path, name, entry);
  if (!data.ok()) return data.status();
  return file.Read(*data, entry.size, absl::StrCat("zip entry ", Shown(name)));
}

// ---------------------------------------------------------------------------------------------
// The pickle machine.

struct Value;
using ValuePtr = std::shared_ptr<Value>;

struct Value {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal,
                    kStorage, kTensor, kMark, kOpaque };
  Kind kind = Kind::kNone;
  int64_t i = 0;                                    // int; storage: numel
  std::string s;                                    // string; global "module.name"; dtype
  std::vector<ValuePtr> items;                      // tuple, list
  std::vector<std::pair<ValuePtr, ValuePtr>> dict;  // dict / OrderedDict, in order
  std::vector<int64_t> shape;                       // tensor
  std::vector<int64_t> stride;                      // tensor
  std::string storage;                              // storage, tensor: the record's key
  int64_t storage_numel = 0;                        // tensor
  int64_t offset = 0;                               // tensor: in elements
};

ValuePtr Make(Value::Kind kind) {
  auto v = std::make_shared<Value>();
  v->kind = kind;
  return v;
}

const char* StorageDtype(const std::string& global) {
  static const std::map<std::string, const char*> kTypes{
      {"torch.FloatStorage", "F32"}, {"torch.DoubleStorage", "F64"}, {"torch.HalfStorage", "F16"},
      {"torch.BFloat16Storage", "BF16"}, {"torch.LongStorage", "I64"}, {"torch.IntStorage", "I32"},
      {"torch.ShortStorage", "I16"}, {"torch.CharStorage", "I8"}, {"torch.ByteStorage", "U8"},
      {"torch.BoolStorage", "BOOL"}};
  auto it = kTypes.find(global);
  return it == kTypes.end() ? nullptr : it->second;
}

class Unpickler {
 public:
  // `records`: the archive's "data/<key>" sizes (storages are checked against them, not read).
  Unpickler(const std::string& data, std::map<std::string, uint64_t> records, std::string where)
      : data_(data), records_(std::move(records)), where_(std::move(where)) {}
  // Every value's children are let go first, so that none is freed from within another: a file
  // can nest values a million deep (TUPLE1 after TUPLE1, or lists appended through the memo),
  // and freeing such a chain recursively overflowed the stack. Values that Run() handed out stay
  // valid as long as the unpickler lives (declare it first).
  ~Unpickler() {
    for (const ValuePtr& v : all_) {
      v->items.clear();
      v->dict.clear();
    }
  }
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  absl::StatusOr<ValuePtr> Run() {
    while (!done_) {
      if (pos_ >= data_.size()) return Bad("the pickle ends before STOP");
      op_at_ = pos_;
      const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
      absl::Status st = Step(op);
      if (!st.ok()) return st;
      if (values_ > kMaxPickleValues) {
        return Bad(absl::StrCat("more than ", kMaxPickleValues, " pickle values: not a state dict this reader takes"));
      }
    }
    if (stack_.empty()) return Bad("empty pickle");
    return stack_.back();
  }

 private:
  ValuePtr New(Value::Kind kind) {
    all_.push_back(Make(kind));
    return all_.back();
  }
  absl::Status Bad(const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, " byte ", op_at_, ": ", why));
  }
  bool Need(size_t n) const { return n <= data_.size() - pos_; }
  uint64_t ReadLE(size_t n) {
    uint64_t v = Le(data_, pos_, n);
    pos_ += n;
    return v;
  }
  absl::StatusOr<uint64_t> Arg(size_t n) {
    if (!Need(n)) return Bad("truncated opcode argument");
    return ReadLE(n);
  }
  std::string ReadLine() {
    size_t end = data_.find('\n', pos_);
    if (end == std::string::npos) end = data_.size();
    std::string line = data_.substr(pos_, end - pos_);
    pos_ = std::min(data_.size(), end + 1);
    return line;
  }
  absl::StatusOr<ValuePtr> Pop() {
    if (stack_.empty()) return Bad("stack underflow");
    ValuePtr v = stack_.back();
    stack_.pop_back();
    return v;
  }
  // Pops everything above the last MARK.
  absl::StatusOr<std::vector<ValuePtr>> PopMark() {
    std::vector<ValuePtr> out;
    while (!stack_.empty() && stack_.back()->kind != Value::Kind::kMark) {
      out.push_back(stack_.back());
      stack_.pop_back();
    }
    if (stack_.empty()) return Bad("MARK not found");
    stack_.pop_back();
    std::reverse(out.begin(), out.end());
    return out;
  }
  void Push(ValuePtr v) {
    ++values_;
    stack_.push_back(std::move(v));
  }
  void PushInt(int64_t i) {
    auto v = New(Value::Kind::kInt);
    v->i = i;
    Push(v);
  }
  ValuePtr Tuple(std::vector<ValuePtr> items) {
    auto v = New(Value::Kind::kTuple);
    v->items = std::move(items);
    return v;
  }

  // persistent_id(('storage', <StorageType>, key, location, numel)).
  absl::StatusOr<ValuePtr> Storage(const ValuePtr& pid) {
    if (pid->kind != Value::Kind::kTuple || pid->items.size() < 5 || pid->items[0]->s != "storage" ||
        pid->items[2]->kind != Value::Kind::kString || pid->items[4]->kind != Value::Kind::kInt) {
      return Bad("persistent id is not ('storage', type, key, location, numel)");
    }
    const char* dtype = StorageDtype(pid->items[1]->s);
    if (dtype == nullptr) return Bad(absl::StrCat("storage type ", Shown(pid->items[1]->s)));
    const std::string& key = pid->items[2]->s;
    if (key.size() > kMaxStorageKeyBytes) {
      return Bad(absl::StrCat("storage key '", Shown(key), "' is longer than ", kMaxStorageKeyBytes, " bytes"));
    }
    // torch names its storages "0", "1", ...: an empty key named the folder entry "data/", which
    // a reader took for a safetensors tensor (its offset and strides ignored).
    if (key.empty() || key.find('/') != std::string::npos) {
      return Bad(absl::StrCat("storage key '", Shown(key), "' is empty or holds '/'"));
    }
    const int64_t numel = pid->items[4]->i;
    auto record = records_.find(key);
    if (record == records_.end()) return Bad(absl::StrCat("storage '", key, "' has no data record in the archive"));
    // One key is one storage: named again with another type or size, a reader would view the
    // first as the second.
    auto [seen, first] = storages_.emplace(key, std::make_pair(std::string(dtype), numel));
    if (!first && (seen->second.first != dtype || seen->second.second != numel)) {
      return Bad(absl::StrCat("storage '", key, "' is named with ", seen->second.second, " elements of ",
                              seen->second.first, " and with ", numel, " of ", dtype));
    }
    if (numel < 0 || static_cast<uint64_t>(numel) > record->second / static_cast<uint64_t>(ElementSize(dtype))) {
      return Bad(absl::StrCat("storage '", key, "' claims ", numel, " elements of ", dtype, "; its record has ",
                              record->second, " bytes"));
    }
    auto v = New(Value::Kind::kStorage);
    v->s = dtype;
    v->i = numel;
    v->storage = key;
    return v;
  }

  absl::StatusOr<ValuePtr> Reduce(const ValuePtr& callable, const ValuePtr& args) {
    // Only a global is called (its name is at most kMaxGlobalBytes); anything else makes an
    // opaque value of no name, never a copy of what was "called".
    static const std::string kNoName;
    const std::string& fn = callable->kind == Value::Kind::kGlobal ? callable->s : kNoName;
    if (fn == "collections.OrderedDict") return New(Value::Kind::kDict);
    if (fn == "torch._utils._rebuild_tensor_v2" || fn == "torch._utils._rebuild_tensor") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks, ...)
      bool ints = args->items.size() >= 4;
      for (size_t k = 2; ints && k < 4; ++k) {
        for (const ValuePtr& item : args->items[k]->items) ints = ints && item->kind == Value::Kind::kInt;
      }
      if (!ints || args->items[0]->kind != Value::Kind::kStorage ||
          args->items[1]->kind != Value::Kind::kInt || args->items[2]->items.size() > kMaxRank ||
          args->items[2]->items.size() != args->items[3]->items.size()) {
        return Bad(absl::StrCat(fn, " arguments are not (storage, offset, size, stride, ...)"));
      }
      auto v = New(Value::Kind::kTensor);
      v->s = args->items[0]->s;
      // The last element the view reaches must lie inside the storage. Sizes and strides come
      // from the file: the sums and products are checked for overflow (a wrapped extent would
      // pass the bound), and so is the view's element count (what the worker allocates).
      int64_t last = args->items[1]->i;
      int64_t numel = 1;
      bool empty = false, too_many = false;
      for (size_t d = 0; d < args->items[2]->items.size(); ++d) {
        const int64_t size = args->items[2]->items[d]->i;
        const int64_t stride = args->items[3]->items[d]->i;
        int64_t extent = 0;
        if (size < 0 || stride < 0 || (size > 0 && stride > (int64_t{1} << 40)) ||
            (size > 0 && (__builtin_mul_overflow(size - 1, stride, &extent) ||
                          __builtin_add_overflow(last, extent, &last)))) {
          return Bad(absl::StrCat("tensor size ", size, " / stride ", stride));
        }
        if (size == 0) empty = true;
        // Of the non-zero sizes, so that an empty view's other sizes are bounded too.
        if (size > 0 && (__builtin_mul_overflow(numel, size, &numel) || numel > kMaxViewElements)) too_many = true;
        v->shape.push_back(size);
        v->stride.push_back(stride);
      }
      if (too_many) {
        return Bad(absl::StrCat("tensor ", ShapeText(v->shape), " has more than ", kMaxViewElements, " elements"));
      }
      // An expanded view (stride 0) holds more elements than its storage, and whoever reads it
      // makes them all: a file of a few hundred bytes would claim gigabytes.
      if (!empty && numel > args->items[0]->i && numel > kMaxExpandedElements) {
        return Bad(absl::StrCat("tensor ", ShapeText(v->shape), " expands a storage of ", args->items[0]->i,
                                " elements to ", numel, ", more than ", kMaxExpandedElements,
                                " (not a state dict this reader takes)"));
      }
      v->storage = args->items[0]->storage;
      v->storage_numel = args->items[0]->i;
      v->offset = args->items[1]->i;
      if (!empty && (args->items[1]->i < 0 || last >= args->items[0]->i)) {
        return Bad(absl::StrCat("tensor ", ShapeText(v->shape), " at offset ", args->items[1]->i,
                                " reaches past its storage of ", args->items[0]->i, " elements"));
      }
      return v;
    }
    if (fn == "torch._utils._rebuild_parameter") {
      if (args->items.empty() || args->items[0]->kind != Value::Kind::kTensor) {
        return Bad("_rebuild_parameter arguments");
      }
      return args->items[0];
    }
    auto v = New(Value::Kind::kOpaque);
    v->s = fn;
    return v;
  }

  // A global's "module.name", at most kMaxGlobalBytes (real ones are under 50).
  absl::Status PushGlobal(const std::string& module, const std::string& name) {
    if (module.size() + name.size() + 1 > kMaxGlobalBytes) {
      return Bad(absl::StrCat("a global name of ", module.size() + name.size() + 1, " bytes (more than ",
                              kMaxGlobalBytes, ")"));
    }
    auto v = New(Value::Kind::kGlobal);
    v->s = absl::StrCat(module, ".", name);
    Push(v);
    return absl::OkStatus();
  }

  absl::Status PushString(size_t width) {
    absl::StatusOr<uint64_t> n = Arg(width);
    if (!n.ok()) return n.status();
    if (!Need(*n)) return Bad("truncated string");
    auto v = New(Value::Kind::kString);
    v->s = data_.substr(pos_, *n);
    pos_ += *n;
    Push(v);
    return absl::OkStatus();
  }

  absl::Status Step(uint8_t op) {
    switch (op) {
      case 0x80: return Arg(1).status();                             // PROTO
      case 0x95: return Arg(8).status();                             // FRAME
      case '.': done_ = true; return absl::OkStatus();               // STOP
      case '(': Push(New(Value::Kind::kMark)); return absl::OkStatus();
      case '}': Push(New(Value::Kind::kDict)); return absl::OkStatus();
      case ']': Push(New(Value::Kind::kList)); return absl::OkStatus();
      case ')': Push(Tuple({})); return absl::OkStatus();
      case 'N': Push(New(Value::Kind::kNone)); return absl::OkStatus();
      case 0x88:
      case 0x89: {  // NEWTRUE, NEWFALSE
        auto v = New(Value::Kind::kBool);
        v->i = op == 0x88;
        Push(v);
        return absl::OkStatus();
      }
      case 'K':
      case 'M':
      case 'J': {  // BININT1, BININT2, BININT
        absl::StatusOr<uint64_t> raw = Arg(op == 'K' ? 1 : op == 'M' ? 2 : 4);
        if (!raw.ok()) return raw.status();
        PushInt(op == 'J' ? static_cast<int32_t>(*raw) : static_cast<int64_t>(*raw));
        return absl::OkStatus();
      }
      case 0x8a: {  // LONG1
        absl::StatusOr<uint64_t> n = Arg(1);
        if (!n.ok()) return n.status();
        if (*n > 8) return Bad("LONG1 wider than 64 bits");
        absl::StatusOr<uint64_t> raw = Arg(*n);
        if (!raw.ok()) return raw.status();
        int64_t v = static_cast<int64_t>(*raw);
        if (*n > 0 && *n < 8 && (*raw >> (8 * *n - 1)) & 1) v -= static_cast<int64_t>(uint64_t{1} << (8 * *n));
        PushInt(v);
        return absl::OkStatus();
      }
      case 'G': {  // BINFLOAT (the value is not needed)
        absl::Status st = Arg(8).status();
        Push(New(Value::Kind::kFloat));
        return st;
      }
      case 0x8c: case 'U': case 'C': return PushString(1);  // SHORT_BINUNICODE, SHORT_BINSTRING, SHORT_BINBYTES
      case 'X': case 'T': case 'B': return PushString(4);   // BINUNICODE, BINSTRING, BINBYTES
      case 0x8d: case 0x8e: return PushString(8);           // BINUNICODE8, BINBYTES8
      case 'c': {  // GLOBAL
        const std::string module = ReadLine();
        return PushGlobal(module, ReadLine());
      }
      case 0x93: {  // STACK_GLOBAL: two strings (anything else would let names grow by doubling)
        auto name = Pop();
        if (!name.ok()) return name.status();
        auto module = Pop();
        if (!module.ok()) return module.status();
        if ((*module)->kind != Value::Kind::kString || (*name)->kind != Value::Kind::kString) {
          return Bad("STACK_GLOBAL of values that are not two strings");
        }
        return PushGlobal((*module)->s, (*name)->s);
      }
      case 'q': case 'r': {  // BINPUT, LONG_BINPUT
        absl::StatusOr<uint64_t> id = Arg(op == 'q' ? 1 : 4);
        if (!id.ok()) return id.status();
        return Put(*id);
      }
      case 0x94: return Put(memo_.size());  // MEMOIZE
      case 'h': case 'j': {  // BINGET, LONG_BINGET
        absl::StatusOr<uint64_t> id = Arg(op == 'h' ? 1 : 4);
        if (!id.ok()) return id.status();
        auto it = memo_.find(*id);
        if (it == memo_.end()) return Bad(absl::StrCat("GET of unknown memo ", *id));
        Push(it->second);
        return absl::OkStatus();
      }
      case 't': {
        auto items = PopMark();
        if (!items.ok()) return items.status();
        Push(Tuple(std::move(*items)));
        return absl::OkStatus();
      }
      case 0x85: case 0x86: case 0x87: {  // TUPLE1-3
        const size_t n = op - 0x84;
        if (stack_.size() < n) return Bad("stack underflow");
        std::vector<ValuePtr> items(stack_.end() - n, stack_.end());
        stack_.resize(stack_.size() - n);
        Push(Tuple(std::move(items)));
        return absl::OkStatus();
      }
      case 'Q': {  // BINPERSID
        auto pid = Pop();
        if (!pid.ok()) return pid.status();
        auto storage = Storage(*pid);
        if (!storage.ok()) return storage.status();
        Push(*storage);
        return absl::OkStatus();
      }
      case 'R': case 0x81: {  // REDUCE, NEWOBJ
        auto args = Pop();
        if (!args.ok()) return args.status();
        auto callable = Pop();
        if (!callable.ok()) return callable.status();
        auto v = Reduce(*callable, *args);
        if (!v.ok()) return v.status();
        Push(*v);
        return absl::OkStatus();
      }
      case 'b': return Pop().status();  // BUILD: object state (OrderedDict _metadata, ...) is not needed
      case 's': {  // SETITEM
        auto value = Pop();
        if (!value.ok()) return value.status();
        auto key = Pop();
        if (!key.ok()) return key.status();
        if (stack_.empty()) return Bad("SETITEM without a dict");
        if (stack_.back()->kind == Value::Kind::kDict) stack_.back()->dict.emplace_back(*key, *value);
        return absl::OkStatus();
      }
      case 'u': {  // SETITEMS
        auto items = PopMark();
        if (!items.ok()) return items.status();
        if (stack_.empty()) return Bad("SETITEMS without a dict");
        if (stack_.back()->kind == Value::Kind::kDict) {
          for (size_t k = 0; k + 1 < items->size(); k += 2) stack_.back()->dict.emplace_back((*items)[k], (*items)[k + 1]);
        }
        return absl::OkStatus();
      }
      case 'a': {  // APPEND
        auto value = Pop();
        if (!value.ok()) return value.status();
        if (stack_.empty()) return Bad("APPEND without a list");
        stack_.back()->items.push_back(*value);
        return absl::OkStatus();
      }
      case 'e': {  // APPENDS
        auto items = PopMark();
        if (!items.ok()) return items.status();
        if (stack_.empty()) return Bad("APPENDS without a list");
        for (auto& v : *items) stack_.back()->items.push_back(v);
        return absl::OkStatus();
      }
      default:
        return Bad(absl::StrCat("unsupported pickle opcode 0x", absl::Hex(op)));
    }
  }
  absl::Status Put(uint64_t id) {
    if (stack_.empty()) return Bad("PUT on an empty stack");
    memo_[id] = stack_.back();
    ++values_;
    return absl::OkStatus();
  }

  const std::string& data_;
  std::map<std::string, uint64_t> records_;
  std::string where_;
  size_t pos_ = 0;
  size_t op_at_ = 0;
  bool done_ = false;
  std::vector<ValuePtr> stack_;
  std::vector<ValuePtr> all_;  // every value made (the destructor's flat teardown)
  std::map<uint64_t, ValuePtr> memo_;
  int64_t values_ = 0;  // pushed or memoized, counted against kMaxPickleValues
  std::map<std::string, std::pair<std::string, int64_t>> storages_;  // key -> dtype, numel
};

// String keys only; tensors kept, mappings recursed (the worker's ReadTorchSaveTensors names
// tensors by this too). Empty when it worked, else why not:
// - `budget` bounds the entries visited and `depth` the nesting (the memo can make a dict refer
//   to itself, or many keys to one dict, which fans out into millions of names);
// - names of tensors and mappings are at most kMaxNameBytes, tensors at most kMaxTensors (so a
//   fan-out ends at kMaxTensors names of at most 1 KB);
// - a second tensor of one name ({"a": {"b": t}} beside "a.b", or a key pickled twice) is
//   refused, since which of the two a model would get is arbitrary.
std::string Flatten(const Value& dict, const std::string& prefix, TensorIndex* out, int64_t* budget, int depth,
                    std::set<std::string>* names) {
  if (depth > 64) return "nests deeper than 64 (or refers to itself)";
  // A key set twice in one mapping where either value is a tensor or a mapping: torch.load keeps
  // the last value, whatever its kind (a tensor then a number was read here as the tensor).
  // Either reading is a guess, so it is refused.
  std::map<absl::string_view, std::pair<int, bool>> keys;  // -> (times set, a tensor or mapping among them)
  for (const auto& [k, v] : dict.dict) {
    // Not a key longer than a name may be: a tensor or a mapping under it is refused below, and
    // comparing such keys (one 30 MB string set 500,000 times through the memo) took minutes.
    if (k->kind != Value::Kind::kString || k->s.size() > kMaxNameBytes) continue;
    auto& [times, holds] = keys[k->s];
    ++times;
    holds = holds || v->kind == Value::Kind::kTensor || v->kind == Value::Kind::kDict;
    if (times > 1 && holds) {
      return absl::StrCat("is ambiguous: the key '", Shown(prefix.empty() ? k->s : prefix + "." + k->s),
                          "' is set twice in one mapping (torch.load keeps the last value)");
    }
  }
  for (const auto& [k, v] : dict.dict) {
    if (--*budget < 0) return absl::StrCat("has more than ", kMaxFlattenEntries, " entries (or refers to itself)");
    if (k->kind != Value::Kind::kString) continue;
    if (v->kind != Value::Kind::kTensor && v->kind != Value::Kind::kDict) continue;  // a number, a string, ...
    if (prefix.size() + 1 + k->s.size() > kMaxNameBytes) {
      return absl::StrCat("has a name longer than ", kMaxNameBytes, " bytes: '",
                          Shown(prefix.empty() ? k->s : absl::StrCat(prefix, ".", k->s.substr(0, 200))), "'");
    }
    std::string name = prefix.empty() ? k->s : prefix + "." + k->s;
    if (v->kind == Value::Kind::kTensor) {
      if (!names->insert(name).second) {
        return absl::StrCat("is ambiguous: two tensors are named '", name,
                            "' once nested mappings are joined with '.' (a nested key and a dotted one, or a key "
                            "twice)");
      }
      if (static_cast<int64_t>(out->size()) >= kMaxTensors) return absl::StrCat("holds more than ", kMaxTensors, " tensors");
      out->push_back(TensorEntry{name, v->s, v->shape, v->storage, v->storage_numel, v->offset, v->stride});
    }
    if (v->kind == Value::Kind::kDict) {
      std::string why = Flatten(*v, name, out, budget, depth + 1, names);
      if (!why.empty()) return why;
    }
  }
  return "";
}

absl::StatusOr<TensorIndex> ReadTorchSaveArchive(const File& file, const std::string& path) {
  absl::StatusOr<std::map<std::string, ZipEntry>> entries = ReadZipDirectory(file, path);
  if (!entries.ok()) return entries.status();
  // "<archive>/data.pkl" (the archive folder is named after the file by torch.save); one only:
  // readers would differ in which of two they take.
  std::string pickle_name;
  for (const auto& [name, entry] : *entries) {
    const size_t slash = name.find('/');
    if (name == "data.pkl" || (slash != std::string::npos && name.substr(slash) == "/data.pkl")) {
      if (!pickle_name.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": two pickles, ", Shown(pickle_name), " and ",
                                                       Shown(name), ": not a torch.save file"));
      }
      pickle_name = name;
    }
  }
  if (pickle_name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": a zip archive without */data.pkl: not a torch.save file"));
  }
  const std::string prefix = pickle_name.substr(0, pickle_name.size() - std::string("data.pkl").size());
  if (entries->count(prefix + "constants.pkl") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": a TorchScript archive (an aviary checkpoint such as best.pt?), not a state dict; "
              "`aviary export --format state_dict` or `aviary weights import` writes one"));
  }
  // The storages' records, each checked to lie in the file as stored bytes.
  std::map<std::string, uint64_t> records;
  std::map<std::string, uint64_t> record_offsets;
  std::vector<ByteRange> ranges;
  for (const auto& [name, entry] : *entries) {
    if (name.rfind(prefix + "data/", 0) != 0) continue;
    absl::StatusOr<uint64_t> data = ZipEntryData(file, path, name, entry);
    if (!data.ok()) return data.status();
    records[name.substr(prefix.size() + 5)] = entry.size;
    record_offsets[name.substr(prefix.size() + 5)] = *data;
    ranges.push_back({*data, entry.size, absl::StrCat("zip entry ", Shown(name))});
  }
  // Records sharing bytes (entries of a crafted directory pointing at one stored file) would be
  // read once per key, however small the file.
  if (const std::string why = Overlap(std::move(ranges)); !why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a torch.save zip archive: ", why));
  }
  // The byte order of the storages (a file without the record is little-endian, as torch reads it).
  if (auto order = entries->find(prefix + "byteorder"); order != entries->end()) {
    absl::StatusOr<std::string> text = ReadZipEntry(file, path, order->first, order->second, 16);
    if (!text.ok()) return text.status();
    if (*text != "little") {
      return absl::InvalidArgumentError(absl::StrCat(path, ": written on a '", Shown(*text),
                                                     "'-endian machine; only little-endian files are read"));
    }
  }
  absl::StatusOr<std::string> pickle = ReadZipEntry(file, path, pickle_name, entries->at(pickle_name), kMaxPickle);
  if (!pickle.ok()) return pickle.status();
  Unpickler unpickler(*pickle, std::move(records), absl::StrCat(path, ": ", pickle_name));
  absl::StatusOr<ValuePtr> root = unpickler.Run();
  if (!root.ok()) return root.status();
  if ((*root)->kind != Value::Kind::kDict) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a state dict (a mapping of names to tensors) at the top"));
  }
  TensorIndex out;
  int64_t budget = kMaxFlattenEntries;
  std::set<std::string> names;
  if (const std::string why = Flatten(**root, "", &out, &budget, 0, &names); !why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the state dict ", why));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": the state dict holds no tensors"));
  for (TensorEntry& entry : out) entry.data_offset = record_offsets.at(entry.storage);
  // What a reader makes of all the views together: a file of many expanded views of one small
  // storage passes each view's cap and still claims terabytes.
  std::map<std::string, int64_t> storage_numel;
  int64_t views = 0, storages = 0;
  for (const TensorEntry& entry : out) {
    int64_t numel = std::count(entry.shape.begin(), entry.shape.end(), 0) > 0 ? 0 : 1;
    for (int64_t d : entry.shape) numel *= numel == 0 ? 0 : d;  // a non-empty view: at most kMaxViewElements
    views = views > INT64_MAX - numel ? INT64_MAX : views + numel;
    if (storage_numel.emplace(entry.storage, entry.storage_numel).second) storages += entry.storage_numel;
  }
  if (storages < (INT64_MAX - kMaxTotalExtraElements) / 4 && views > 4 * storages + kMaxTotalExtraElements) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": its ", out.size(), " tensors view ", views,
                                                   " elements of storages holding ", storages,
                                                   " (not a state dict this reader takes)"));
  }
  return out;
}

}  // namespace

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<TensorIndex> ReadTensorIndex(const std::string& path) {
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  if (!file.ok()) return file.status();
  // A plausible header length and a '{'. A length past the file's end is a safetensors file cut
  // short (its reader says so), not a zip: a zip's first 8 bytes read as more than 16 MB.
  if ((*file)->size() >= 10) {
    absl::StatusOr<std::string> head = (*file)->Read(0, 9, "the header");
    if (!head.ok()) return head.status();
    const uint64_t n = Le(*head, 0, 8);
    if (n > 1 && n <= kMaxSafetensorsHeader && (*head)[8] == '{') return ReadSafetensorsIndex(**file, path);
  }
  return ReadTorchSaveArchive(**file, path);
}

absl::StatusOr<TensorIndex> ReadTorchSaveIndex(const std::string& path) {
  absl::StatusOr<std::unique_ptr<File>> file = File::Open(path);
  if (!file.ok()) return file.status();
  return ReadTorchSaveArchive(**file, path);
}

}  // namespace aviary::common
