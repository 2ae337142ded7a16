#include "worker/torch_pickle.h"

#include <caffe2/serialize/inline_container.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <variant>

#include "absl/strings/str_cat.h"
#include "common/files.h"

namespace aviary::worker {
namespace {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

// The pickle values a state dict needs.
struct Value {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal,
                    kStorage, kTensor, kMark, kOpaque };
  Kind kind = Kind::kNone;
  int64_t i = 0;
  double f = 0;
  std::string s;                                   // string; global "module.name"
  std::vector<ValuePtr> items;                     // tuple, list
  std::vector<std::pair<ValuePtr, ValuePtr>> dict; // dict / OrderedDict, in order
  at::Tensor tensor;                               // storage (1-D) or tensor
};

ValuePtr Make(Value::Kind kind) {
  auto v = std::make_shared<Value>();
  v->kind = kind;
  return v;
}

at::ScalarType StorageType(const std::string& name, bool* ok) {
  static const std::map<std::string, at::ScalarType> kTypes{
      {"torch.FloatStorage", at::kFloat},     {"torch.DoubleStorage", at::kDouble},
      {"torch.HalfStorage", at::kHalf},       {"torch.BFloat16Storage", at::kBFloat16},
      {"torch.LongStorage", at::kLong},       {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},     {"torch.CharStorage", at::kChar},
      {"torch.ByteStorage", at::kByte},       {"torch.BoolStorage", at::kBool}};
  auto it = kTypes.find(name);
  *ok = it != kTypes.end();
  return *ok ? it->second : at::kFloat;
}

class Unpickler {
 public:
  Unpickler(const std::string& data, caffe2::serialize::PyTorchStreamReader* zip,
            std::string path)
      : data_(data), zip_(zip), path_(std::move(path)) {}

  absl::StatusOr<ValuePtr> Run() {
    while (true) {
      if (pos_ >= data_.size()) return Bad("pickle ends before STOP");
      const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
      absl::Status st = Step(op);
      if (!st.ok()) return st;
      if (done_) break;
    }
    if (stack_.empty()) return Bad("empty pickle");
    return stack_.back();
  }

 private:
  absl::Status Bad(const std::string& why) const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": unsupported torch.save content at byte ", pos_, ": ", why));
  }
  bool Need(size_t n) const { return pos_ + n <= data_.size(); }
  uint64_t ReadLE(size_t n) {
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= static_cast<uint64_t>(static_cast<uint8_t>(data_[pos_ + k])) << (8 * k);
    pos_ += n;
    return v;
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
  void PushString(std::string s) {
    auto v = Make(Value::Kind::kString);
    v->s = std::move(s);
    stack_.push_back(v);
  }
  void PushInt(int64_t i) {
    auto v = Make(Value::Kind::kInt);
    v->i = i;
    stack_.push_back(v);
  }
  ValuePtr Tuple(std::vector<ValuePtr> items) {
    auto v = Make(Value::Kind::kTuple);
    v->items = std::move(items);
    return v;
  }

  absl::StatusOr<ValuePtr> Storage(const ValuePtr& pid) {
    // ('storage', storage_type, key, location, numel)
    if (pid->kind != Value::Kind::kTuple || pid->items.size() < 5 ||
        pid->items[0]->s != "storage") {
      return Bad("persistent id is not a storage");
    }
    bool ok = false;
    at::ScalarType type = StorageType(pid->items[1]->s, &ok);
    if (!ok) return Bad(absl::StrCat("storage type ", pid->items[1]->s));
    const std::string key = pid->items[2]->s;
    const int64_t numel = pid->items[4]->i;
    auto cached = storages_.find(key);
    if (cached != storages_.end()) return cached->second;
    const std::string record = absl::StrCat("data/", key);
    if (!zip_->hasRecord(record)) return Bad(absl::StrCat("missing record ", record));
    auto [ptr, size] = zip_->getRecord(record);
    const size_t want = static_cast<size_t>(numel) * at::elementSize(type);
    if (size < want) {
      return Bad(absl::StrCat("record ", record, " has ", size, " bytes, expected ", want));
    }
    auto v = Make(Value::Kind::kStorage);
    v->tensor = at::empty({numel}, at::TensorOptions().dtype(type));
    if (want > 0) std::memcpy(v->tensor.data_ptr(), ptr.get(), want);
    storages_[key] = v;
    return v;
  }

  absl::StatusOr<ValuePtr> Reduce(const ValuePtr& callable, const ValuePtr& args) {
    const std::string& fn = callable->s;
    if (fn == "collections.OrderedDict") return Make(Value::Kind::kDict);
    if (fn == "torch._utils._rebuild_tensor_v2" || fn == "torch._utils._rebuild_tensor") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks, ...)
      if (args->items.size() < 4 || args->items[0]->kind != Value::Kind::kStorage) {
        return Bad("_rebuild_tensor arguments");
      }
      std::vector<int64_t> size, stride;
      for (const auto& d : args->items[2]->items) size.push_back(d->i);
      for (const auto& d : args->items[3]->items) stride.push_back(d->i);
      auto v = Make(Value::Kind::kTensor);
      v->tensor = args->items[0]->tensor.as_strided(size, stride, args->items[1]->i).clone();
      return v;
    }
    if (fn == "torch._utils._rebuild_parameter") {
      if (args->items.empty() || args->items[0]->kind != Value::Kind::kTensor) {
        return Bad("_rebuild_parameter arguments");
      }
      return args->items[0];
    }
    auto v = Make(Value::Kind::kOpaque);
    v->s = fn;
    return v;
  }

  absl::Status Step(uint8_t op) {
    switch (op) {
      case 0x80: pos_ += 1; return absl::OkStatus();                    // PROTO
      case 0x95: pos_ += 8; return absl::OkStatus();                    // FRAME
      case '.': done_ = true; return absl::OkStatus();                  // STOP
      case '(': stack_.push_back(Make(Value::Kind::kMark)); return absl::OkStatus();
      case '}': stack_.push_back(Make(Value::Kind::kDict)); return absl::OkStatus();
      case ']': stack_.push_back(Make(Value::Kind::kList)); return absl::OkStatus();
      case ')': stack_.push_back(Tuple({})); return absl::OkStatus();
      case 'N': stack_.push_back(Make(Value::Kind::kNone)); return absl::OkStatus();
      case 0x88:
      case 0x89: {
        auto v = Make(Value::Kind::kBool);
        v->i = op == 0x88;
        stack_.push_back(v);
        return absl::OkStatus();
      }
      case 'K': if (!Need(1)) return Bad("truncated"); PushInt(static_cast<int64_t>(ReadLE(1))); return absl::OkStatus();
      case 'M': if (!Need(2)) return Bad("truncated"); PushInt(static_cast<int64_t>(ReadLE(2))); return absl::OkStatus();
      case 'J': if (!Need(4)) return Bad("truncated"); PushInt(static_cast<int32_t>(ReadLE(4))); return absl::OkStatus();
      case 0x8a: {  // LONG1
        if (!Need(1)) return Bad("truncated");
        size_t n = ReadLE(1);
        if (n > 8 || !Need(n)) return Bad("LONG1 wider than 64 bits");
        uint64_t raw = ReadLE(n);
        int64_t v = static_cast<int64_t>(raw);
        if (n > 0 && n < 8 && (raw >> (8 * n - 1)) & 1) v -= static_cast<int64_t>(uint64_t{1} << (8 * n));
        PushInt(v);
        return absl::OkStatus();
      }
      case 'G': {  // BINFLOAT, big-endian
        if (!Need(8)) return Bad("truncated");
        uint64_t bits = 0;
        for (int k = 0; k < 8; ++k) bits = (bits << 8) | static_cast<uint8_t>(data_[pos_ + k]);
        pos_ += 8;
        auto v = Make(Value::Kind::kFloat);
        std::memcpy(&v->f, &bits, 8);
        stack_.push_back(v);
        return absl::OkStatus();
      }
      case 'X':
      case 0x8c:
      case 0x8d:
      case 'U':
      case 'T': {
        size_t width = (op == 0x8c || op == 'U') ? 1 : (op == 0x8d ? 8 : 4);
        if (!Need(width)) return Bad("truncated");
        size_t n = ReadLE(width);
        if (!Need(n)) return Bad("truncated string");
        PushString(data_.substr(pos_, n));
        pos_ += n;
        return absl::OkStatus();
      }
      case 'c': {  // GLOBAL
        std::string module = ReadLine();
        std::string name = ReadLine();
        auto v = Make(Value::Kind::kGlobal);
        v->s = module + "." + name;
        stack_.push_back(v);
        return absl::OkStatus();
      }
      case 0x93: {  // STACK_GLOBAL
        auto name = Pop();
        if (!name.ok()) return name.status();
        auto module = Pop();
        if (!module.ok()) return module.status();
        auto v = Make(Value::Kind::kGlobal);
        v->s = (*module)->s + "." + (*name)->s;
        stack_.push_back(v);
        return absl::OkStatus();
      }
      case 'q': if (!Need(1)) return Bad("truncated"); return Put(ReadLE(1));
      case 'r': if (!Need(4)) return Bad("truncated"); return Put(ReadLE(4));
      case 0x94: return Put(memo_.size());
      case 'h': if (!Need(1)) return Bad("truncated"); return Get(ReadLE(1));
      case 'j': if (!Need(4)) return Bad("truncated"); return Get(ReadLE(4));
      case 't': {
        auto items = PopMark();
        if (!items.ok()) return items.status();
        stack_.push_back(Tuple(std::move(*items)));
        return absl::OkStatus();
      }
      case 0x85:
      case 0x86:
      case 0x87: {
        size_t n = op - 0x84;
        if (stack_.size() < n) return Bad("stack underflow");
        std::vector<ValuePtr> items(stack_.end() - n, stack_.end());
        stack_.resize(stack_.size() - n);
        stack_.push_back(Tuple(std::move(items)));
        return absl::OkStatus();
      }
      case 'Q': {  // BINPERSID
        auto pid = Pop();
        if (!pid.ok()) return pid.status();
        auto storage = Storage(*pid);
        if (!storage.ok()) return storage.status();
        stack_.push_back(*storage);
        return absl::OkStatus();
      }
      case 'R':
      case 0x81: {  // REDUCE, NEWOBJ
        auto args = Pop();
        if (!args.ok()) return args.status();
        auto callable = Pop();
        if (!callable.ok()) return callable.status();
        auto v = Reduce(*callable, *args);
        if (!v.ok()) return v.status();
        stack_.push_back(*v);
        return absl::OkStatus();
      }
      case 'b': {  // BUILD: object state (OrderedDict _metadata, ...) is not needed
        auto state = Pop();
        return state.status();
      }
      case 's': {
        auto value = Pop();
        if (!value.ok()) return value.status();
        auto key = Pop();
        if (!key.ok()) return key.status();
        if (stack_.empty()) return Bad("SETITEM without a dict");
        if (stack_.back()->kind == Value::Kind::kDict) stack_.back()->dict.emplace_back(*key, *value);
        return absl::OkStatus();
      }
      case 'u': {
        auto items = PopMark();
        if (!items.ok()) return items.status();
        if (stack_.empty()) return Bad("SETITEMS without a dict");
        if (stack_.back()->kind == Value::Kind::kDict) {
          for (size_t k = 0; k + 1 < items->size(); k += 2) {
            stack_.back()->dict.emplace_back((*items)[k], (*items)[k + 1]);
          }
        }
        return absl::OkStatus();
      }
      case 'a': {
        auto value = Pop();
        if (!value.ok()) return value.status();
        if (stack_.empty()) return Bad("APPEND without a list");
        stack_.back()->items.push_back(*value);
        return absl::OkStatus();
      }
      case 'e': {
        auto items = PopMark();
        if (!items.ok()) return items.status();
        if (stack_.empty()) return Bad("APPENDS without a list");
        for (auto& v : *items) stack_.back()->items.push_back(v);
        return absl::OkStatus();
      }
      default:
        return Bad(absl::StrCat("pickle opcode 0x", absl::Hex(op)));
    }
  }
  absl::Status Put(uint64_t id) {
    if (stack_.empty()) return Bad("PUT on an empty stack");
    memo_[id] = stack_.back();
    return absl::OkStatus();
  }
  absl::Status Get(uint64_t id) {
    auto it = memo_.find(id);
    if (it == memo_.end()) return Bad(absl::StrCat("GET of unknown memo ", id));
    stack_.push_back(it->second);
    return absl::OkStatus();
  }

  const std::string& data_;
  caffe2::serialize::PyTorchStreamReader* zip_;
  std::string path_;
  size_t pos_ = 0;
  bool done_ = false;
  std::vector<ValuePtr> stack_;
  std::map<uint64_t, ValuePtr> memo_;
  std::map<std::string, ValuePtr> storages_;
};

// Bounded as common/tensor_index.cc's Flatten (entries visited, nesting): a pickle memo can make
// a dict hold itself. False when a bound is spent.
bool Flatten(const ValuePtr& dict, const std::string& prefix,
             std::vector<std::pair<std::string, at::Tensor>>* out, int64_t* budget, int depth) {
  if (depth > 64) return false;
  for (const auto& [k, v] : dict->dict) {
    if (--*budget < 0) return false;
    if (k->kind != Value::Kind::kString) continue;
    std::string name = prefix.empty() ? k->s : prefix + "." + k->s;
    if (v->kind == Value::Kind::kTensor) out->emplace_back(name, v->tensor);
    if (v->kind == Value::Kind::kDict && !Flatten(v, name, out, budget, depth + 1)) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadTorchSaveTensors(
    const std::string& path) {
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> zip;
  std::string pickle;
  try {
    zip = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    auto [ptr, size] = zip->getRecord("data.pkl");
    pickle.assign(static_cast<const char*>(ptr.get()), size);
  } catch (const std::exception& e) {
    std::string what = e.what();
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a torch.save zip archive (files from PyTorch < 1.6 must be re-saved): ",
        what.substr(0, what.find('\n'))));
  }
  Unpickler unpickler(pickle, zip.get(), path);
  absl::StatusOr<ValuePtr> root = unpickler.Run();
  if (!root.ok()) return root.status();
  if ((*root)->kind != Value::Kind::kDict) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a state dict (a mapping of names to tensors) at the top"));
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  int64_t budget = 1 << 22;
  if (!Flatten(*root, "", &out, &budget, 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": the state dict has more than ", 1 << 22, " entries, nests deeper than 64 or refers to itself"));
  }
  return out;
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
  return common::WriteFileAtomically(path, zip);
}

}  // namespace aviary::worker
