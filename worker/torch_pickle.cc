#include "worker/torch_pickle.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <caffe2/serialize/inline_container.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "common/tensor_index.h"

namespace aviary::worker {
namespace {

at::ScalarType StorageType(const std::string& dtype, bool* ok) {
  static const std::map<std::string, at::ScalarType> kTypes{
      {"F32", at::kFloat}, {"F64", at::kDouble}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},  {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},   {"BOOL", at::kBool}};
  auto it = kTypes.find(dtype);
  *ok = it != kTypes.end();
  return *ok ? it->second : at::kFloat;
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadWeightsFile(const std::string& path,
                                                                                bool torch_save_only) {
  // The file as it is before its index is read, and as the values are read from it: the same
  // one (a rename between would read one file's offsets in another).
  const std::optional<common::FileVersion> before = common::VersionOf(path);
  AVIARY_ASSIGN_OR_RETURN(const common::TensorIndex index,
                          torch_save_only ? common::ReadTorchSaveIndex(path) : common::ReadTensorIndex(path));
  // O_NONBLOCK: a FIFO swapped in since the index was read opens at once (and is refused below)
  // instead of waiting for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    const std::string message = absl::StrCat(path, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::InvalidArgumentError(message);
  }
  if (struct stat st; ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file (replaced since its index was read?)"));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  auto unchanged = [&]() -> absl::Status {
    const std::optional<common::FileVersion> now = common::VersionOfOpen(fd);
    if (before && now && *now != *before) {
      return absl::UnavailableError(absl::StrCat(path, ": replaced or changed while it was read; read it again"));
    }
    return absl::OkStatus();
  };
  AVIARY_RETURN_IF_ERROR(unchanged());
  // `n` bytes at `offset` into `dst` (the index checked that they lie in the file; a file cut
  // since is an error naming what was read).
  auto read = [&](void* dst, uint64_t n, uint64_t offset, const std::string& what) -> absl::Status {
    auto* out = static_cast<char*>(dst);
    uint64_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd, out + done, n - done, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": reading ", what, " (", n, " bytes at byte ", offset,
                                                       "): ", got < 0 ? std::strerror(errno) : "end of file"));
      }
      done += static_cast<uint64_t>(got);
    }
    return absl::OkStatus();
  };
  std::map<std::string, at::Tensor> storages;  // torch.save: by key (tensors may share one)
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(index.size());
  for (const common::TensorEntry& entry : index) {
    bool ok = false;
    const at::ScalarType type = StorageType(entry.dtype, &ok);
    if (!ok) return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", entry.name, ": dtype ", entry.dtype));
    try {
      if (entry.storage.empty()) {  // safetensors: the tensor's own bytes
        at::Tensor t = at::empty(entry.shape, at::TensorOptions().dtype(type));
        const uint64_t n = static_cast<uint64_t>(t.numel()) * at::elementSize(type);
        AVIARY_RETURN_IF_ERROR(read(t.data_ptr(), n, entry.data_offset, absl::StrCat("tensor ", entry.name)));
        out.emplace_back(entry.name, std::move(t));
        continue;
      }
      // torch.save: the index checked each view against the storage it names, and that a key
      // names one storage (one type and size: torch.save memoizes a storage).
      at::Tensor& storage = storages[entry.storage];
      if (!storage.defined()) {
        storage = at::empty({entry.storage_numel}, at::TensorOptions().dtype(type));
        const uint64_t n = static_cast<uint64_t>(entry.storage_numel) * at::elementSize(type);
        AVIARY_RETURN_IF_ERROR(read(storage.data_ptr(), n, entry.data_offset,
                                    absl::StrCat("record data/", entry.storage, " of tensor ", entry.name)));
      }
      out.emplace_back(entry.name, storage.as_strided(entry.shape, entry.stride, entry.storage_offset).clone());
    } catch (const std::exception& e) {  // an allocation torch refuses (memory, sizes)
      std::string what = e.what();
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", entry.name, " ",
                                                     common::ShapeText(entry.shape), " ", entry.dtype, ": ",
                                                     what.substr(0, what.find('\n'))));
    }
  }
  AVIARY_RETURN_IF_ERROR(unchanged());  // written in place meanwhile
  return out;
}

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadTorchSaveTensors(
    const std::string& path) {
  return ReadWeightsFile(path, /*torch_save_only=*/true);
}

}  // namespace aviary::worker

namespace aviary::worker {
namespace {

// Pickle protocol 2 opcodes the writer uses.
constexpr char kProto = '\x80';
constexpr char kGlobal = 'c';
constexpr char kEmptyTuple = ')';
constexpr char kMark = '(';
constexpr char kTuple = 't';
constexpr char kReduce = 'R';
constexpr char kSetItems = 'u';
constexpr char kBinPersId = 'Q';
constexpr char kBinUnicode = 'X';
constexpr char kBinInt = 'J';
constexpr char kLong1 = '\x8a';
constexpr char kNewFalse = '\x89';
constexpr char kStop = '.';

class Pickler {
 public:
  void Proto() { out_ += kProto; out_ += '\x02'; }
  void Global(const char* module, const char* name) {
    absl::StrAppend(&out_, std::string(1, kGlobal), module, "\n", name, "\n");
  }
  void String(const std::string& s) {
    out_ += kBinUnicode;
    AppendLe(static_cast<uint32_t>(s.size()), 4);
    out_ += s;
  }
  void Int(int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) {
      out_ += kBinInt;
      AppendLe(static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
    } else {
      out_ += kLong1;
      out_ += '\x08';
      AppendLe(static_cast<uint64_t>(v), 8);
    }
  }
  void IntTuple(at::IntArrayRef values) {
    if (values.empty()) {
      out_ += kEmptyTuple;
      return;
    }
    out_ += kMark;
    for (int64_t v : values) Int(v);
    out_ += kTuple;
  }
  void Op(char op) { out_ += op; }
  // OrderedDict() on the stack.
  void EmptyOrderedDict() {
    Global("collections", "OrderedDict");
    out_ += kEmptyTuple;
    out_ += kReduce;
  }
  std::string& bytes() { return out_; }

 private:
  void AppendLe(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xff);
  }
  std::string out_;
};

const char* StorageName(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "FloatStorage";
    case at::kDouble: return "DoubleStorage";
    case at::kHalf: return "HalfStorage";
    case at::kBFloat16: return "BFloat16Storage";
    case at::kLong: return "LongStorage";
    case at::kInt: return "IntStorage";
    case at::kShort: return "ShortStorage";
    case at::kChar: return "CharStorage";
    case at::kByte: return "ByteStorage";
    case at::kBool: return "BoolStorage";
    default: return nullptr;
  }
}

}  // namespace

absl::Status WriteTorchSaveTensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                   const std::string& path) {
  std::vector<at::Tensor> storages;
  Pickler p;
  p.Proto();
  p.EmptyOrderedDict();
  p.Op(kMark);
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const char* storage = StorageName(t.scalar_type());
    if (storage == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has dtype ",
                                                     c10::toString(t.scalar_type()),
                                                     ", which a torch.save storage cannot hold"));
    }
    const std::string key = std::to_string(storages.size());
    storages.push_back(t);
    p.String(name);
    p.Global("torch._utils", "_rebuild_tensor_v2");
    p.Op(kMark);
    // The persistent id ('storage', torch.<Type>Storage, key, location, numel).
    p.Op(kMark);
    p.String("storage");
    p.Global("torch", storage);
    p.String(key);
    p.String("cpu");
    p.Int(t.numel());
    p.Op(kTuple);
    p.Op(kBinPersId);
    p.Int(0);  // storage offset
    p.IntTuple(t.sizes());
    p.IntTuple(t.strides());
    p.Op(kNewFalse);  // requires_grad
    p.EmptyOrderedDict();  // backward hooks
    p.Op(kTuple);
    p.Op(kReduce);
  }
  p.Op(kSetItems);
  p.Op(kStop);

  std::string zip;
  try {
    caffe2::serialize::PyTorchStreamWriter writer([&zip](const void* data, size_t n) -> size_t {
      zip.append(static_cast<const char*>(data), n);
      return n;
    });
    writer.writeRecord("data.pkl", p.bytes().data(), p.bytes().size());
    static const char kLittle[] = "little";
    writer.writeRecord("byteorder", kLittle, sizeof(kLittle) - 1);
    for (size_t i = 0; i < storages.size(); ++i) {
      const at::Tensor& t = storages[i];
      writer.writeRecord(absl::StrCat("data/", i), t.data_ptr(), t.numel() * t.element_size());
    }
    writer.writeEndOfFile();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    return absl::InternalError(absl::StrCat(path, ": writing the torch.save archive: ",
                                            msg.substr(0, msg.find('\n'))));
  }
  return common::WriteOutputFileAtomically(path, zip);  // a link as the output is written through
}

}  // namespace aviary::worker
