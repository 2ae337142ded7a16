#include "coordinator/console.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/files.h"
#include "common/status.h"
#include "common/utf8.h"
#include "coordinator/console_assets.h"
#include "coordinator/content_hash.h"
#include "coordinator/init.h"
#include "google/protobuf/util/json_util.h"
#include "yaml-cpp/yaml.h"

namespace aviary::coordinator {
namespace {

// The login cookie's name: this prefix and the console's port (a browser keeps cookies per host,
// not per port: two consoles on one host, or several `ssh -L` tunnels to localhost, overwrote
// each other's sessions), "__Host-" in front under TLS (no Domain, Path=/, Secure: a sibling
// host or a plain-HTTP page cannot set it).
constexpr char kCookiePrefix[] = "aviary_console_";
// A login session's life; the cookie's Max-Age says the same.
constexpr int kSessionLifetimeS = 12 * 3600;
// Logged-out sessions remembered at most (until they expire).
constexpr size_t kMaxSessions = 4096;
constexpr char kCsrfHeader[] = "X-Aviary-Console";
// civetweb threads; each event stream holds one, so streams stop below the total and the
// rest stay for the pages and /api.
constexpr int kServerThreads = 64;
constexpr int kMaxStreams = 48;
// Per holder: a login session (every tab of a user's browser shares its cookie), a bearer token
// or, without authentication, the peer's address. A page refused a stream loads its data by GET
// instead (console.js).
constexpr int kMaxStreamsPerHolder = 16;
constexpr int kMaxStreamsPerToken = 32;  // over a token's logins
constexpr int kDefaultJobLimit = 200;
// The jobs' serialized size at most (their JSON is about twice that): a page every tab reloads
// and every stream gets each interval. Older jobs past it are left out, and counted.
constexpr size_t kMaxJobListBytes = size_t{8} << 20;
// A quiet stream's ping interval. A peer that closed is found at the second write after its FIN:
// at 10 s a reload of a few tabs kept their old streams' slots (16 per holder) for about 20 s,
// and the new ones were refused (the pages fell back to polling).
constexpr auto kKeepalive = std::chrono::seconds(3);
// How old the /api/events payloads may be: every open stream shares one build of the job list
// (up to kDefaultJobLimit jobs with their tasks) and the group list per interval.
constexpr auto kOverviewRefresh = std::chrono::milliseconds(500);

const char kPageCsp[] =
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

// JSON string literal (quotes included). Bytes that are not UTF-8 (a file name in Latin-1, a
// request path) become U+FFFD, so the answer is valid JSON for a strict parser too; U+2028 and
// U+2029 are escaped (JavaScript source before ES2019 ends a line there).
std::string JsonQuote(absl::string_view text) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80) {
      const size_t n = common::Utf8SequenceLength(text, i);
      if (n == 0) {
        out += "\\ufffd";
        ++i;
        continue;
      }
      const absl::string_view sequence = text.substr(i, n);
      if (sequence == "\xe2\x80\xa8") {
        out += "\\u2028";
      } else if (sequence == "\xe2\x80\xa9") {
        out += "\\u2029";
      } else {
        out.append(sequence.data(), sequence.size());
      }
      i += n;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '<': out += "\\u003c"; break;
      case '>': out += "\\u003e"; break;
      case '&': out += "\\u0026"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          absl::StrAppend(&out, "\\u00", absl::string_view("0123456789abcdef" + (c >> 4), 1),
                          absl::string_view("0123456789abcdef" + (c & 15), 1));
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  out += "\"";
  return out;
}

// A finite number, or null.
std::string JsonNumber(double value) {
  if (!std::isfinite(value)) return "null";
  return absl::StrCat(value);
}

// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235);
// nullopt for another scheme or none.
std::optional<std::string> BearerToken(const std::string& header) {
  constexpr absl::string_view kScheme = "Bearer ";
  if (!absl::StartsWithIgnoreCase(header, kScheme)) return std::nullopt;
  return header.substr(kScheme.size());
}

// Every byte outside [A-Za-z0-9._~-] as %XX: a cookie value or a query parameter. civetweb's
// mg_url_encode leaves ";,$()" as they are, and a token holding ';' ended its cookie there (the
// browser kept the part before it: a login that let nobody in).
std::string PercentEncode(absl::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";  // as mg_url_encode writes it
  std::string out;
  out.reserve(text.size() * 3);
  for (const char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '~' || c == '-') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

std::string HtmlEscape(absl::string_view text) {
  return absl::StrReplaceAll(text, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"\"", "&quot;"}, {"'", "&#39;"}});
}

// The message as proto3 JSON with proto field names and every field (the shape of
// `aviary status --json`, on one line).
std::string ProtoJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string json;
  auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    // Still a JSON object (callers append fields to it), saying what went wrong and where.
    return absl::StrCat("{\"error\":{\"code\":\"INTERNAL\",\"message\":",
                        JsonQuote(absl::StrCat(message.GetTypeName(), " as JSON: ", status.ToString())), "}}");
  }
  return json;
}

bool IsJobId(absl::string_view text) {
  if (text.size() != 13 || text[0] != 'j') return false;
  for (char c : text.substr(1)) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// A task's name within its job ("finetune-f0"): letters, digits, '.', '_', '-'.
bool IsTaskName(absl::string_view text) {
  if (text.empty() || text.size() > 64) return false;
  for (char c : text) {
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  }
  return true;
}

// A login's `next`: a path (and query) of this site, or "/jobs". One leading '/', then only
// [A-Za-z0-9/_.,?=&#%~+-]: no "//" (another host), no backslash, no control characters (browsers
// drop tab, CR and LF from a URL, so "/\t/evil.example" is "//evil.example"; CR LF in a Location
// would start a header of its own), no quotes or spaces.
std::string SafeNext(const std::string& next) {
  constexpr char kFallback[] = "/jobs";
  if (next.empty() || next[0] != '/' || next.size() > 2048 || next.find("//") != std::string::npos) return kFallback;
  for (char ch : next) {
    const auto c = static_cast<unsigned char>(ch);
    if (absl::ascii_isalnum(c)) continue;
    if (std::strchr("/_.,?=&#%~+-", c) == nullptr || c == '\0') return kFallback;
  }
  return next;
}

// This machine's own names, lower case: gethostname, its first label, and the canonical name
// the resolver gives it (a fully qualified name when gethostname is short). Read once.
std::vector<std::string> OwnHostNames() {
  std::vector<std::string> names;
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return names;
  const std::string mine = absl::AsciiStrToLower(name);
  names.push_back(mine);
  names.push_back(mine.substr(0, mine.find('.')));
  addrinfo hints{};
  hints.ai_flags = AI_CANONNAME;
  addrinfo* found = nullptr;
  if (::getaddrinfo(name, nullptr, &hints, &found) == 0) {
    if (found != nullptr && found->ai_canonname != nullptr) names.push_back(absl::AsciiStrToLower(found->ai_canonname));
    ::freeaddrinfo(found);
  }
  return names;
}

// With authentication off (allow_no_auth): whether a request's Host header names this console
// by an IP address, as localhost or by one of this machine's own names (`own_names`) - names
// that a page on another site cannot re-point at this address (DNS rebinding) to read the API
// or cancel jobs. No Host header (HTTP/1.0; browsers always send one) passes.
absl::Status CheckHostWithoutAuth(const std::string& header, const std::vector<std::string>& own_names) {
  if (header.empty()) return absl::OkStatus();
  std::string host = absl::AsciiStrToLower(header);
  if (host[0] == '[') {  // [IPv6]:port, a zone id written %25eth0
    const size_t close = host.find(']');
    std::string address = close == std::string::npos ? "" : host.substr(1, close - 1);
    if (const size_t zone = address.find('%'); zone != std::string::npos) address.resize(zone);
    in6_addr parsed;
    if (!address.empty() && ::inet_pton(AF_INET6, address.c_str(), &parsed) == 1) return absl::OkStatus();
  } else {
    if (const size_t colon = host.rfind(':'); colon != std::string::npos) host.resize(colon);
    if (!host.empty() && host.back() == '.') host.pop_back();
    in_addr address;
    if (::inet_pton(AF_INET, host.c_str(), &address) == 1) return absl::OkStatus();
    if (host == "localhost" || absl::EndsWith(host, ".localhost")) return absl::OkStatus();
    for (const std::string& name : own_names) {
      if (!name.empty() && host == name) return absl::OkStatus();
    }
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "Host '", header, "': with authentication off (allow_no_auth) the console answers only to an IP address, "
      "localhost or this machine's own name (", absl::StrJoin(own_names, ", "),
      "), names a page on another site cannot take over by DNS rebinding; open it by one of those, or turn "
      "authentication on (aviary-coordinator init)"));
}


std::string StatusCodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  absl::AsciiStrToUpper(&name);
  return absl::StrReplaceAll(name, {{" ", "_"}});
}

// Flattens a YAML tree into dotted keys (list items by index, as --set names them).
void Flatten(const YAML::Node& node, const std::string& prefix, std::map<std::string, std::string>* out) {
  if (node.IsMap()) {
    for (const auto& item : node) {
      const std::string key = item.first.as<std::string>();
      Flatten(item.second, prefix.empty() ? key : absl::StrCat(prefix, ".", key), out);
    }
  } else if (node.IsSequence()) {
    if (node.size() == 0) (*out)[prefix] = "[]";
    for (size_t i = 0; i < node.size(); ++i) Flatten(node[i], absl::StrCat(prefix, ".", i), out);
  } else if (node.IsScalar()) {
    (*out)[prefix] = node.Scalar();
  } else {
    (*out)[prefix] = "";
  }
}

int LogMessage(const mg_connection* /*conn*/, const char* message) {
  static common::Logger log("console");
  log.Debug(absl::StrCat("civetweb: ", message));
  return 1;
}

int HandleRequest(mg_connection* conn, void* cbdata) { return static_cast<Console*>(cbdata)->Handle(conn); }

}  // namespace

int HttpStatusFor(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kInvalidArgument: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kFailedPrecondition: return 409;
    case absl::StatusCode::kAlreadyExists: return 409;
    case absl::StatusCode::kAborted: return 409;
    case absl::StatusCode::kOutOfRange: return 400;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnimplemented: return 501;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

// One of the console's event streams, held while in scope; held() false, with the reason in
// status(), when all are taken or its holder has kMaxStreamsPerHolder open.
class StreamSlot {
 public:
  // Whose streams these are, each with its bound (see Request::holders).
  using Holders = std::vector<std::pair<std::string, int>>;
  StreamSlot(Console* console, Holders holders) : console_(console), holders_(std::move(holders)) {
    absl::MutexLock lock(&console_->streams_mu_);
    if (console_->streams_ >= kMaxStreams) {
      status_ = absl::ResourceExhaustedError(
          absl::StrCat(kMaxStreams, " event streams are open already; reload later"));
      return;
    }
    for (const auto& [holder, bound] : holders_) {
      auto it = console_->streams_by_holder_.find(holder);
      if (it != console_->streams_by_holder_.end() && it->second >= bound) {
        status_ = absl::ResourceExhaustedError(absl::StrCat(
            "this ", holder.substr(0, holder.find(' ')), " has ", bound, " event streams open already; close a page"));
        return;
      }
    }
    for (const auto& [holder, bound] : holders_) ++console_->streams_by_holder_[holder];
    ++console_->streams_;
    held_ = true;
  }
  ~StreamSlot() {
    if (!held_) return;
    absl::MutexLock lock(&console_->streams_mu_);
    --console_->streams_;
    for (const auto& [holder, bound] : holders_) {
      auto it = console_->streams_by_holder_.find(holder);
      if (it != console_->streams_by_holder_.end() && --it->second <= 0) console_->streams_by_holder_.erase(it);
    }
  }
  StreamSlot(const StreamSlot&) = delete;
  StreamSlot& operator=(const StreamSlot&) = delete;
  bool held() const { return held_; }
  const absl::Status& status() const { return status_; }

 private:
  Console* const console_;
  const Holders holders_;
  bool held_ = false;
  absl::Status status_;
};

// One request: what it asks and how to answer it.
class Console::Request {
 public:
  explicit Request(mg_connection* conn) : conn_(conn), info_(mg_get_request_info(conn)) {
    path_ = info_->local_uri != nullptr ? info_->local_uri : "/";
    method_ = info_->request_method != nullptr ? info_->request_method : "";
    query_ = info_->query_string != nullptr ? info_->query_string : "";
  }

  const std::string& path() const { return path_; }
  const std::string& method() const { return method_; }
  // The query string as sent (still URL-encoded; "" when none).
  const std::string& query() const { return query_; }
  mg_connection* conn() { return conn_; }

  std::string Header(const char* name) const {
    const char* value = mg_get_header(conn_, name);
    return value != nullptr ? value : "";
  }

  // Every value of the cookie `name`, in the order sent: a browser sends one per path and
  // domain that matches (another service on the host may have set one for a longer path, which
  // comes first), so the caller tries each.
  std::vector<std::string> Cookies(const std::string& name) const {
    std::vector<std::string> values;
    const char* header = mg_get_header(conn_, "Cookie");
    if (header == nullptr) return values;
    for (absl::string_view pair : absl::StrSplit(header, ';')) {
      pair = absl::StripAsciiWhitespace(pair);
      if (!absl::ConsumePrefix(&pair, name) || !absl::ConsumePrefix(&pair, "=")) continue;
      if (pair.empty() || pair.size() > 4096) continue;
      std::vector<char> decoded(pair.size() + 1);
      const int m = mg_url_decode(pair.data(), static_cast<int>(pair.size()), decoded.data(),
                                  static_cast<int>(decoded.size()), 1);
      if (m > 0) values.emplace_back(decoded.data(), m);
    }
    return values;
  }

  // A query parameter ("" when absent).
  std::string Query(const char* name) const { return Var(query_, name); }
  // Whether the query names `name` at all ("?tasks=" does, with an empty value).
  bool HasQuery(const char* name) const {
    char unused[1];
    return mg_get_var(query_.data(), query_.size(), name, unused, sizeof(unused)) != -1;
  }

  // The body (at most 64 KiB).
  std::string Body() {
    std::string body;
    char buffer[4096];
    int n;
    while (body.size() < 65536 && (n = mg_read(conn_, buffer, sizeof(buffer))) > 0) body.append(buffer, n);
    return body;
  }

  static std::string Var(const std::string& data, const char* name) {
    // As long as a whole request may be (civetweb's max_request_size, 16 KiB by default).
    std::vector<char> buffer(16384);
    const int n = mg_get_var(data.data(), data.size(), name, buffer.data(), buffer.size());
    return n < 0 ? "" : std::string(buffer.data(), n);
  }

  void Reply(int status, const std::string& content_type, const std::string& body,
             const std::string& extra_headers = "") {
    mg_printf(conn_,
              "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
              "X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"
              "Connection: close\r\n%s\r\n",
              status, mg_get_response_code_text(conn_, status), content_type.c_str(), body.size(),
              extra_headers.c_str());
    if (method_ != "HEAD") mg_write(conn_, body.data(), body.size());
    status_ = status;
  }
  void Json(const std::string& json) { Reply(200, "application/json; charset=utf-8", json); }
  void Error(const absl::Status& status) {
    const int http = HttpStatusFor(status);
    // A 401 says how to authenticate (RFC 9110, 11.6.1): a bearer token, or the login page's cookie.
    Reply(http, "application/json; charset=utf-8",
          absl::StrCat("{\"error\":{\"code\":", JsonQuote(StatusCodeName(status.code())),
                       ",\"message\":", JsonQuote(status.message()), "}}"),
          http == 401 ? "WWW-Authenticate: Bearer realm=\"aviary\"\r\n" : "");
  }
  void MethodNotAllowed(const char* allow, const std::string& message) {
    Reply(405, "application/json; charset=utf-8",
          absl::StrCat("{\"error\":{\"code\":\"INVALID_ARGUMENT\",\"message\":", JsonQuote(message), "}}"),
          absl::StrCat("Allow: ", allow, "\r\n"));
  }
  void Redirect(const std::string& location, const std::string& extra_headers = "") {
    Reply(303, "text/plain; charset=utf-8", "see " + location,
          absl::StrCat("Location: ", location, "\r\n", extra_headers));
  }

  // Starts a text/event-stream answer.
  bool StartStream() {
    const int n = mg_printf(conn_,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                            "X-Content-Type-Options: nosniff\r\nX-Accel-Buffering: no\r\nConnection: close\r\n\r\n"
                            "retry: 2000\n\n");
    status_ = 200;
    last_write_ = std::chrono::steady_clock::now();
    return n > 0;
  }
  // One event; false when the peer went away.
  bool Event(const char* name, const std::string& data) {
    // In three writes: `data` (a job list of up to ~16 MB, shared by every stream) is not copied
    // per stream for the time a slow browser takes to read it.
    const std::string head = absl::StrCat("event: ", name, "\ndata: ");
    last_write_ = std::chrono::steady_clock::now();
    return mg_write(conn_, head.data(), head.size()) == static_cast<int>(head.size()) &&
           mg_write(conn_, data.data(), data.size()) == static_cast<int>(data.size()) &&
           mg_write(conn_, "\n\n", 2) == 2;
  }
  // A `ping` event when nothing was written for a while: finds peers that went away, and tells
  // the page its stream is alive (a comment line would not reach its script, which reopens a
  // stream silent for 35 s: a dead connection the browser had not noticed).
  bool KeepAlive() {
    if (std::chrono::steady_clock::now() - last_write_ < kKeepalive) return true;
    last_write_ = std::chrono::steady_clock::now();
    constexpr char kPing[] = "event: ping\ndata: {}\n\n";
    return mg_write(conn_, kPing, sizeof(kPing) - 1) == static_cast<int>(sizeof(kPing) - 1);
  }

  int status() const { return status_; }

  // Who calls: the bearer token of the Authorization header, else the login cookie. (Another
  // scheme in the header, a proxy's Basic authentication in front of the console, is the proxy's:
  // the cookie decides.)
  absl::Status Authorize(Console& console, const Authenticator& auth, const char* what, RoleSet allowed) {
    std::string token;
    if (std::optional<std::string> bearer = BearerToken(Header("Authorization"))) {
      token = *std::move(bearer);
    } else {
      const std::vector<std::string> ids = Cookies(console.cookie_name());
      for (const std::string& id : ids) {
        if (std::optional<std::string> session = console.SessionToken(id); session.has_value()) {
          token = *std::move(session);
          session_id_ = id;
          by_cookie_ = true;
          break;
        }
      }
      if (!by_cookie_ && !auth.tokens()->no_auth()) {
        return absl::UnauthenticatedError(
            ids.empty() ? absl::StrCat(what, ": no token: send 'Authorization: Bearer <token>' or log in at /login")
                       : absl::StrCat(what, ": the login session has ended (logged out, ",
                                      kSessionLifetimeS / 3600, " hours after its login, or its token was "
                                      "removed): log in again at /login"));
      }
    }
    token_ = token;
    allowed_ = allowed;
    return auth.CheckBearer(token, what, allowed, &role_);
  }
  // Whether the token Authorize accepted still has a role it allowed (a SIGHUP reload may have
  // removed it since) and its login session, if it came by one, is still live (not logged out or
  // expired): event streams ask on each event and keepalive poll.
  bool StillAuthorized(Console& console, const Authenticator& auth) const {
    if (!session_id_.empty() && !console.SessionToken(session_id_).has_value()) return false;
    return auth.CheckBearer(token_, "console event stream", allowed_).ok();
  }
  // The login session's id (the cookie's value) when the cookie named a live one.
  const std::string& session_id() const { return session_id_; }
  bool by_cookie() const { return by_cookie_; }
  // The peer's address as civetweb saw it (behind the TLS front: its loopback relay).
  std::string peer() const { return info_->remote_addr; }
  Role role() const { return role_; }
  // Whose streams these are, for the per-holder limit: the token Authorize checked (hashed: not
  // kept in the clear); without authentication (where any token passes, so a new one each time
  // would be a new holder) the peer's address; "" (no per-holder limit) when that address is
  // the TLS front's loopback relay, which every browser shares.
  // A login (one browser: its tabs share the cookie) has kMaxStreamsPerHolder, and its token
  // kMaxStreamsPerToken over all its logins (one viewer token shared by a team is many browsers,
  // and logging in again is no way past the total).
  std::vector<std::pair<std::string, int>> holders(const Authenticator& auth, bool behind_tls_front) const {
    if (by_cookie_) {
      return {{"login " + Sha256Hex(session_id_), kMaxStreamsPerHolder},
              {"token " + Sha256Hex(token_), kMaxStreamsPerToken}};
    }
    if (!auth.tokens()->no_auth()) return {{"token " + Sha256Hex(token_), kMaxStreamsPerHolder}};
    if (behind_tls_front) return {};
    return {{absl::StrCat("address ", info_->remote_addr), kMaxStreamsPerHolder}};
  }

 private:
  mg_connection* conn_;
  const mg_request_info* info_;
  std::string path_;
  std::string method_;
  std::string query_;
  int status_ = 0;
  bool by_cookie_ = false;
  std::string token_;  // what Authorize checked
  std::string session_id_;  // the live login session it came by, if any
  RoleSet allowed_ = 0;
  Role role_ = Role::kViewer;
  std::chrono::steady_clock::time_point last_write_;
};

absl::StatusOr<std::unique_ptr<Console>> Console::Start(const ConsoleOptions& options, Scheduler* scheduler,
                                                        Store* store, const Authenticator* auth) {
  if (options.listen.find(',') != std::string::npos) {  // civetweb would open one listener per item
    return absl::InvalidArgumentError(absl::StrCat("console_listen '", options.listen, "': one HOST:PORT only"));
  }
  std::unique_ptr<Console> console(new Console(options, scheduler, store, auth));
  if (auth->tokens()->no_auth()) console->own_names_ = OwnHostNames();  // for the Host check
  mg_init_library(0);
  const bool tls = console->tls();
  // With TLS civetweb serves plain HTTP on loopback only, behind the TLS front.
  const std::string ports = tls ? "127.0.0.1:0" : options.listen;
  const std::string threads = absl::StrCat(kServerThreads);
  // request_timeout_ms: a request whose head has not arrived 10 s after its first byte is cut,
  // and so is a write a peer has not taken in 10 s (a stalled event stream). Each connection
  // holds a server thread until then, so a client trickling requests from many sockets still
  // ties up the 64 threads (docs/SERVICE.md, "Web console": serve it on a trusted network).
  const char* mg_options[] = {"listening_ports", ports.c_str(),
                              "num_threads", threads.c_str(),
                              "request_timeout_ms", "10000",
                              nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  callbacks.log_message = LogMessage;
  console->ctx_ = mg_start(&callbacks, nullptr, mg_options);
  if (console->ctx_ == nullptr) {
    if (tls) {  // civetweb was to serve the TLS front on loopback
      return absl::UnavailableError(absl::StrCat("console_listen ", options.listen, " (TLS): cannot serve the "
                                                 "console's backend on ", ports, " for its TLS front (no "
                                                 "loopback interface?)"));
    }
    return absl::UnavailableError(absl::StrCat("console_listen ", ports,
                                               ": cannot serve the console there (address in use, or not an IPv4 "
                                               "address of this host?)"));
  }
  mg_server_port bound[4];
  std::memset(bound, 0, sizeof(bound));
  const int n = mg_get_server_ports(console->ctx_, 4, bound);
  if (n < 1 || bound[0].port <= 0) {
    return absl::UnavailableError(absl::StrCat("console_listen ", options.listen, ": no listening port"));
  }
  console->port_ = bound[0].port;
  if (tls) {
    AVIARY_ASSIGN_OR_RETURN(console->tls_front_, TlsFront::Start(options.listen, console->port_, options.tls_cert_pem,
                                                                 options.tls_key_pem));
    console->port_ = console->tls_front_->port();
  }
  // Its name has the port, known only now; the handler last (a request before it is a 404, not
  // one that reads the name while it is written).
  console->cookie_name_ = absl::StrCat(tls ? "__Host-" : "", kCookiePrefix, console->port_);
  mg_set_request_handler(console->ctx_, "/", HandleRequest, console.get());
  return console;
}

Console::~Console() { Shutdown(); }

void Console::Shutdown() {
  stopping_ = true;
  if (tls_front_ != nullptr) tls_front_->Stop();
  if (ctx_ != nullptr) {
    mg_stop(ctx_);  // waits for the request threads; the streams see stopping_ within 500 ms
    ctx_ = nullptr;
  }
}

int Console::Handle(mg_connection* conn) {
  Request request(conn);
  Route(request);
  return request.status() != 0 ? request.status() : 500;
}

void Console::Route(Request& request) {
  const std::string& path = request.path();
  const std::string& method = request.method();
  const bool get = method == "GET" || method == "HEAD";
  if (auth_->tokens()->no_auth()) {
    // Without authentication the Host header is what stands between the API and a page on
    // another site whose name an attacker re-points at this address (DNS rebinding).
    if (absl::Status host = CheckHostWithoutAuth(request.Header("Host"), own_names_); !host.ok()) {
      return request.Error(host);
    }
  }
  if (method == "POST" && !BearerToken(request.Header("Authorization")).has_value() &&
      request.Header(kCsrfHeader) != "1") {
    // The login cookie, or no authentication: a form on another site could send this POST, but
    // it cannot set this header (and SameSite=Strict keeps the cookie home). A bearer token is
    // what a script sends; any other Authorization (Basic, to a proxy in front) a browser adds
    // by itself. The login form itself is exempt: it carries the token it checks.
    if (path != "/login") {
      return request.Error(absl::PermissionDeniedError(
          absl::StrCat("console POST ", path, ": without an Authorization header (the login cookie, or no "
                       "authentication) a POST needs the header '", kCsrfHeader, ": 1'")));
    }
  }
  if (path == "/" && get) return request.Redirect("/jobs");
  if (path == "/favicon.ico" && get) return request.Redirect("/static/logo.svg");
  if (path == "/login") return ServeLogin(request);
  if (path == "/logout" && method == "POST") {
    // The session ends here, not only the browser's copy of its cookie.
    for (const std::string& id : request.Cookies(cookie_name_)) EndSession(id);
    return request.Redirect("/login", absl::StrCat("Set-Cookie: ", cookie_name_, "=; Path=/; Max-Age=0; HttpOnly; "
                                                   "SameSite=Strict", tls() ? "; Secure" : "", "\r\n"));
  }
  if (absl::StartsWith(path, "/static/") && get) return ServeStatic(request, path.substr(8));
  if (get && (path == "/jobs" || path == "/compare" || path == "/groups" ||
              (absl::StartsWith(path, "/jobs/") && IsJobId(path.substr(6))))) {
    return ServePage(request, path);
  }
  if (!absl::StartsWith(path, "/api/")) {
    return request.Error(absl::NotFoundError(absl::StrCat(path, ": no such page (try /jobs)")));
  }

  // The JSON API: reads need the client or the viewer role.
  const std::vector<std::string> parts = absl::StrSplit(path.substr(5), '/');
  const bool post = method == "POST";
  const bool cancel_path = parts.size() == 3 && parts[0] == "jobs" && parts[2] == "cancel";
  if (post && cancel_path) return ServeCancel(request, parts[1]);
  // Another method than the path's: 405 with the one it takes (a 404 said the cancel did not
  // exist, a 400 that the request was malformed).
  if (cancel_path || !get) {
    return request.MethodNotAllowed(cancel_path ? "POST" : "GET, HEAD",
                                    absl::StrCat(method, " ", path, ": not a method of this path (it takes ",
                                                 cancel_path ? "POST" : "GET", ")"));
  }
  const std::string what = absl::StrCat("console GET ", path);
  absl::Status allowed = request.Authorize(*this, *auth_, what.c_str(), kClientOrViewer);
  if (!allowed.ok()) return request.Error(allowed);
  if (parts.size() == 1 && parts[0] == "session") {
    return request.Json(absl::StrCat("{\"role\":", JsonQuote(RoleName(request.role())),
                                     ",\"auth\":", auth_->tokens()->no_auth() ? "false" : "true",
                                     ",\"grafana_url\":", JsonQuote(options_.grafana_url), "}"));
  }
  if (parts.size() == 1 && parts[0] == "jobs") return ServeJobs(request);
  if (parts.size() == 1 && parts[0] == "groups") return ServeGroups(request);
  if (parts.size() == 1 && parts[0] == "events") return StreamOverview(request);
  if (parts.size() >= 2 && parts[0] == "jobs") {
    if (!IsJobId(parts[1])) {
      return request.Error(absl::InvalidArgumentError(
          absl::StrCat(path, ": '", parts[1], "' is not a job id (j + 12 lowercase hex digits)")));
    }
    if (parts.size() == 2) return ServeJob(request, parts[1]);
    if (parts.size() == 3 && parts[2] == "history") return ServeHistory(request, parts[1]);
    if (parts.size() == 3 && parts[2] == "events") return StreamJob(request, parts[1]);
    if (parts.size() == 5 && parts[2] == "tasks" && parts[4] == "config" && IsTaskName(parts[3])) {
      return ServeTaskConfig(request, absl::StrCat(parts[1], "/", parts[3]));
    }
  }
  request.Error(absl::NotFoundError(absl::StrCat(path, ": no such API path (docs/SERVICE.md, \"Web console\")")));
}

namespace {

// HMAC-SHA256 of `text` keyed by `key`, in hex.
std::string HmacHex(const std::string& key, const std::string& text) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(text.data()),
           text.size(), mac, &length) == nullptr) {
    return "";
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) {
    hex += kHex[mac[i] >> 4];
    hex += kHex[mac[i] & 15];
  }
  return hex;
}

std::string SessionMac(const std::string& token, const std::string& signed_part) {
  return HmacHex(token, absl::StrCat("aviary console session ", signed_part));
}

int64_t UnixSeconds() { return absl::ToUnixSeconds(absl::Now()); }

}  // namespace

absl::StatusOr<std::string> Console::StartSession(const std::string& token) const {
  AVIARY_ASSIGN_OR_RETURN(std::string random, RandomToken());
  const std::string signed_part =
      absl::StrCat(UnixSeconds() + kSessionLifetimeS, ".", random.substr(0, 16), ".", Sha256Hex(token).substr(0, 16));
  const std::string mac = SessionMac(token, signed_part);
  if (mac.empty()) return absl::InternalError("console login: HMAC-SHA256 failed (OpenSSL)");
  return absl::StrCat(signed_part, ".", mac);
}

std::optional<std::string> Console::SessionToken(const std::string& cookie) {
  const std::vector<std::string> parts = absl::StrSplit(cookie, '.');
  int64_t expires = 0;
  if (parts.size() != 4 || !absl::SimpleAtoi(parts[0], &expires) || parts[3].size() != 64) return std::nullopt;
  const int64_t now = UnixSeconds();
  if (expires <= now || expires > now + kSessionLifetimeS + 60) return std::nullopt;
  {
    absl::MutexLock lock(&sessions_mu_);
    if (ended_sessions_.count(parts[3]) != 0) return std::nullopt;
    auto before = ended_before_.find(parts[2]);
    if (before != ended_before_.end() && expires - kSessionLifetimeS <= before->second) return std::nullopt;
  }
  const std::string signed_part = cookie.substr(0, cookie.rfind('.'));
  const std::shared_ptr<const TokenSet> tokens = auth_->tokens();
  for (const std::vector<std::string>* role : {&tokens->client, &tokens->viewer}) {
    for (const std::string& token : *role) {
      if (Sha256Hex(token).substr(0, 16) != parts[2]) continue;
      if (ConstantTimeEquals(SessionMac(token, signed_part), parts[3])) return token;
    }
  }
  return std::nullopt;
}

void Console::EndSession(const std::string& cookie) {
  // Only a session that verifies: a logout needs no token, and made-up cookies filled the set
  // and pushed the real logouts out of it.
  if (!SessionToken(cookie).has_value()) return;
  const std::vector<std::string> parts = absl::StrSplit(cookie, '.');
  int64_t expires = 0;
  if (parts.size() != 4 || !absl::SimpleAtoi(parts[0], &expires)) return;
  const int64_t now = UnixSeconds();
  absl::MutexLock lock(&sessions_mu_);
  for (auto it = ended_sessions_.begin(); it != ended_sessions_.end();) {
    it = it->second <= now ? ended_sessions_.erase(it) : std::next(it);
  }
  if (ended_sessions_.size() >= kMaxSessions) {
    // None is let go before it expires (anyone with a token could log in and out until another
    // user's logout was forgotten, and a copy of that cookie worked again): this one ends every
    // session of its token begun no later than it. A shared viewer token's other users may have
    // to log in again.
    int64_t& before = ended_before_[parts[2]];
    const int64_t issued = expires - kSessionLifetimeS;
    if (issued > before) before = issued;
    if (!said_sessions_full_) {
      said_sessions_full_ = true;
      log_.Warn(absl::StrCat(kMaxSessions, " logged-out sessions are remembered until they expire; "
                             "until some do, a logout ends every session of its token begun before it"));
    }
    return;
  }
  ended_sessions_[parts[3]] = expires;
}

void Console::ServePage(Request& request, const std::string& path) {
  absl::Status allowed = request.Authorize(*this, *auth_, "console page", kClientOrViewer);
  if (!allowed.ok()) {
    // Where it was going, query included (/compare?jobs=A,B), so that it survives the login.
    const std::string target = request.query().empty() ? path : absl::StrCat(path, "?", request.query());
    std::vector<char> encoded(target.size() * 3 + 1);
    mg_url_encode(target.c_str(), encoded.data(), encoded.size());
    // A bearer token that failed, or a cookie: said on the login page. Another scheme (a proxy's
    // Basic credentials passed on) is no token of ours: the login page without an error.
    const std::string error =
        request.by_cookie() || BearerToken(request.Header("Authorization")).has_value() ? "&error=1" : "";
    return request.Redirect(absl::StrCat("/login?next=", encoded.data(), error));
  }
  std::string page = "jobs";
  if (path == "/compare") page = "compare";
  if (path == "/groups") page = "groups";
  if (absl::StartsWith(path, "/jobs/")) page = "job";
  const ConsoleAsset* shell = FindConsoleAsset("shell.html");
  std::string html = absl::StrReplaceAll(shell->body, {{"{{PAGE}}", page}});
  request.Reply(200, "text/html; charset=utf-8", html,
                absl::StrCat("Content-Security-Policy: ", kPageCsp, "\r\n"));
}

void Console::ServeLogin(Request& request) {
  const bool secure = tls();
  if (request.method() == "POST") {
    // Login CSRF: a page on another site could post a token its author holds and swap this
    // browser's cookie for it (the form needs no header such a page cannot send). Browsers say
    // where a POST comes from: Sec-Fetch-Site (same-origin, or none: typed by the user; sent
    // over HTTPS and to localhost), else an Origin whose host is this request's Host (or the
    // X-Forwarded-Host of a reverse proxy that rewrites Host: DEPLOY says to keep it).
    const std::string site = request.Header("Sec-Fetch-Site");
    const std::string origin = request.Header("Origin");
    std::string origin_host = origin;
    for (const char* scheme : {"http://", "https://"}) {
      if (absl::StartsWith(origin_host, scheme)) origin_host = origin_host.substr(std::strlen(scheme));
    }
    const bool foreign =
        !site.empty() ? site != "same-origin" && site != "none"
                      : !origin.empty() && (origin_host == origin || (origin_host != request.Header("Host") &&
                                                                      origin_host != request.Header("X-Forwarded-Host")));
    if (foreign) {
      return request.Error(absl::PermissionDeniedError(absl::StrCat(
          "console POST /login from another site (Origin '", origin, "', Sec-Fetch-Site '",
          request.Header("Sec-Fetch-Site"), "'): log in from this console's own page")));
    }
    const std::string body = request.Body();
    const std::string token = std::string(absl::StripAsciiWhitespace(Request::Var(body, "token")));
    const std::string next = SafeNext(Request::Var(body, "next"));
    absl::Status allowed = auth_->CheckBearer(token, "console login", kClientOrViewer);
    if (!allowed.ok() || token.empty()) {
      log_.Info(absl::StrCat("console login from ", secure ? "a TLS peer" : request.peer(), " refused: ",
                             allowed.ok() ? "empty token" : allowed.message()));
      return request.Redirect(absl::StrCat("/login?error=1&next=", PercentEncode(next)));
    }
    absl::StatusOr<std::string> session = StartSession(token);
    if (!session.ok()) return request.Error(session.status());
    return request.Redirect(next, absl::StrCat("Set-Cookie: ", cookie_name_, "=", *session, "; Path=/; Max-Age=",
                                               kSessionLifetimeS, "; HttpOnly; SameSite=Strict",
                                               secure ? "; Secure" : "", "\r\n"));
  }
  if (request.method() != "GET" && request.method() != "HEAD") {
    return request.MethodNotAllowed("GET, HEAD, POST", absl::StrCat("/login: ", request.method(), " is not GET or POST"));
  }
  const ConsoleAsset* login = FindConsoleAsset("login.html");
  const std::string error = request.Query("error").empty()
                                ? ""
                                : "<p class=\"login-error\" id=\"login-error\">That token is not a client or "
                                  "viewer token of this coordinator.</p>";
  const std::string next = SafeNext(request.Query("next"));
  request.Reply(request.Query("error").empty() ? 200 : 401, "text/html; charset=utf-8",
                absl::StrReplaceAll(login->body, {{"{{ERROR}}", error}, {"{{NEXT}}", HtmlEscape(next)}}),
                absl::StrCat("Content-Security-Policy: ", kPageCsp, "\r\n"));
}

void Console::ServeStatic(Request& request, const std::string& name) {
  if (const ConsoleAsset* asset = FindConsoleAsset(name); asset != nullptr && name != "shell.html" &&
                                                          name != "login.html") {
    return request.Reply(200, asset->content_type, std::string(asset->body));
  }
  // Debian's libjs-dygraphs, read at run time.
  for (const auto& [file, type] : {std::pair<const char*, const char*>{"dygraph.min.js", "text/javascript"},
                                   {"dygraph.min.css", "text/css"}}) {
    if (name != absl::StrCat("dygraphs/", file)) continue;
    const std::string path = absl::StrCat(options_.javascript_dir, "/dygraphs/", file);
    auto text = common::ReadFileToString(path);
    if (!text.ok()) {
      return request.Error(absl::NotFoundError(
          absl::StrCat(path, ": ", text.status().message(), " (install Debian's libjs-dygraphs)")));
    }
    return request.Reply(200, absl::StrCat(type, "; charset=utf-8"), *text);
  }
  request.Error(absl::NotFoundError(absl::StrCat("/static/", name, ": no such file")));
}

namespace {

// `beyond_limit`: older jobs than the newest `limit` (the page says it shows the newest only then).
std::string JobsJsonOf(const std::vector<aviary::v1::JobInfo>& jobs, int limit, int omitted,
                       int beyond_limit) {
  std::string json = "{\"jobs\":[";
  bool first = true;
  for (const aviary::v1::JobInfo& job : jobs) {
    if (!first) json += ",";
    first = false;
    json += ProtoJson(job);
  }
  absl::StrAppend(&json, "],\"limit\":", limit, ",\"omitted\":", omitted,
                  ",\"beyond_limit\":", beyond_limit, "}");
  return json;
}

// A job as the list pages show it: states, epochs, epoch ends and best metrics; not the step
// points' loss, rate, step and times, which change at every progress report.
aviary::v1::JobInfo AsListed(aviary::v1::JobInfo job) {
  job.clear_updated_unix_ms();
  for (aviary::v1::TaskInfo& task : *job.mutable_tasks()) {
    task.clear_updated_unix_ms();
    if (task.has_latest() && !task.latest().epoch_end()) {
      aviary::v1::Metrics kept;
      kept.set_epoch(task.latest().epoch());
      *task.mutable_latest() = kept;
    }
  }
  return job;
}

}  // namespace

std::string Console::JobsJson() const {
  int omitted = 0;
  int beyond_limit = 0;
  std::vector<aviary::v1::JobInfo> jobs =
      scheduler_->ListJobs(kDefaultJobLimit, kMaxJobListBytes, &omitted, &beyond_limit);
  return JobsJsonOf(jobs, kDefaultJobLimit, omitted, beyond_limit);
}

void Console::ServeJobs(Request& request) { request.Json(JobsJson()); }

Console::Overview Console::OverviewJson() {
  absl::MutexLock lock(&overview_mu_);
  const auto now = std::chrono::steady_clock::now();
  if (overview_.jobs == nullptr || now - overview_at_ >= kOverviewRefresh) {
    int omitted = 0;
    int beyond_limit = 0;
    std::vector<aviary::v1::JobInfo> jobs =
        scheduler_->ListJobs(kDefaultJobLimit, kMaxJobListBytes, &omitted, &beyond_limit);
    overview_.jobs = std::make_shared<const std::string>(
        JobsJsonOf(jobs, kDefaultJobLimit, omitted, beyond_limit));
    for (aviary::v1::JobInfo& job : jobs) job = AsListed(std::move(job));
    overview_.jobs_shown = std::make_shared<const std::string>(
        JobsJsonOf(jobs, kDefaultJobLimit, omitted, beyond_limit));
    overview_.groups = std::make_shared<const std::string>(GroupsJson());
    overview_at_ = now;
  }
  return overview_;
}

// A task's checkpoint rows as a JSON list, oldest first.
static void AppendCheckpointRows(std::string* out, const std::vector<Store::CheckpointRow>& rows) {
  *out += "[";
  for (size_t k = 0; k < rows.size(); ++k) {
    const Store::CheckpointRow& row = rows[k];
    absl::StrAppend(out, k > 0 ? "," : "", "{\"path\":", JsonQuote(row.path), ",\"epoch\":", row.epoch,
                    ",\"best\":", row.best ? "true" : "false", ",\"attempt\":", row.attempt, "}");
  }
  *out += "]";
}

void Console::ServeJob(Request& request, const std::string& job_id) {
  absl::StatusOr<aviary::v1::JobInfo> job = scheduler_->GetJob(job_id);
  if (!job.ok()) return request.Error(job.status());
  // ?task=ID: {"checkpoints": {ID: [...]}} alone, one task's rows (the job page's refresh after
  // that task's epoch ends: a sweep's job and all its tasks' rows are megabytes).
  if (const std::string task_id = request.Query("task"); !task_id.empty()) {
    bool found = false;
    for (const aviary::v1::TaskInfo& task : job->tasks()) found = found || task.task_id() == task_id;
    if (!found) {
      return request.Error(absl::NotFoundError(absl::StrCat("job ", job_id, " has no task '", task_id, "'")));
    }
    auto rows = store_->LoadCheckpoints(task_id);
    if (!rows.ok()) return request.Error(rows.status());
    std::string json = absl::StrCat("{\"checkpoints\":{", JsonQuote(task_id), ":");
    AppendCheckpointRows(&json, *rows);
    json += "}}";
    return request.Json(json);
  }
  std::string json = ProtoJson(*job);
  // ?checkpoints=0: the job alone (the page's watch for a retry of a finished job asks every 15 s).
  if (request.Query("checkpoints") == "0") return request.Json(json);
  // The checkpoints each task reported, oldest first: one query for the whole job.
  auto by_task = store_->LoadJobCheckpoints(job_id);
  if (!by_task.ok()) return request.Error(by_task.status());
  static const std::vector<Store::CheckpointRow> kNone;
  std::string checkpoints = "{";
  for (int i = 0; i < job->tasks_size(); ++i) {
    const std::string& task_id = job->tasks(i).task_id();
    auto found = by_task->find(task_id);
    const std::vector<Store::CheckpointRow>* rows = found == by_task->end() ? &kNone : &found->second;
    absl::StrAppend(&checkpoints, i > 0 ? "," : "", JsonQuote(task_id), ":");
    AppendCheckpointRows(&checkpoints, *rows);
  }
  checkpoints += "}";
  if (!json.empty() && json.back() == '}') {
    json.pop_back();
    absl::StrAppend(&json, ",\"checkpoints\":", checkpoints, "}");
  }
  request.Json(json);
}

void Console::ServeHistory(Request& request, const std::string& job_id) {
  // ?tasks=A,B: those tasks' rows only (ids or names within the job; the compare page's few
  // tasks of a sweep, not its tens of thousands of rows).
  std::vector<std::string> tasks = absl::StrSplit(request.Query("tasks"), ',', absl::SkipEmpty());
  // An empty list is no task, not every task.
  if (tasks.empty() && request.HasQuery("tasks")) {
    absl::StatusOr<aviary::v1::JobInfo> job = scheduler_->GetJob(job_id);
    return job.ok() ? request.Json("{\"rows\":[]}") : request.Error(job.status());
  }
  absl::StatusOr<aviary::v1::GetHistoryResponse> history = scheduler_->GetHistory(job_id, tasks);
  if (!history.ok()) return request.Error(history.status());
  request.Json(ProtoJson(*history));
}

void Console::ServeTaskConfig(Request& request, const std::string& task_id) {
  absl::StatusOr<TaskPayload> payload = store_->LoadTaskPayload(task_id);
  if (!payload.ok()) return request.Error(payload.status());
  std::map<std::string, std::string> flat;
  try {
    Flatten(YAML::Load(payload->pipeline_yaml), "", &flat);
  } catch (const YAML::Exception& e) {
    return request.Error(absl::InternalError(absl::StrCat(task_id, ": its stored pipeline does not parse: ", e.what())));
  }
  std::string json = absl::StrCat("{\"task_id\":", JsonQuote(task_id), ",\"yaml\":", JsonQuote(payload->pipeline_yaml),
                                  ",\"flat\":{");
  bool first = true;
  for (const auto& [key, value] : flat) {
    absl::StrAppend(&json, first ? "" : ",", JsonQuote(key), ":", JsonQuote(value));
    first = false;
  }
  json += "}}";
  request.Json(json);
}

std::string Console::GroupsJson() const {
  std::string json = "{\"groups\":[";
  bool first = true;
  for (const Scheduler::GroupView& view : scheduler_->ConsoleGroups()) {
    const aviary::v1::RegisterGroupRequest& info = view.row.info;
    std::vector<std::string> hosts, devices;
    for (const std::string& host : info.hosts()) hosts.push_back(JsonQuote(host));
    for (const std::string& device : info.devices()) devices.push_back(JsonQuote(device));
    absl::StrAppend(&json, first ? "" : ",", "{\"group_id\":", JsonQuote(view.row.group_id),
                    ",\"world_size\":", info.world_size(), ",\"hosts\":[", absl::StrJoin(hosts, ","),
                    "],\"devices\":[", absl::StrJoin(devices, ","), "],\"backend\":", JsonQuote(info.backend()),
                    ",\"version\":", JsonQuote(info.version()), ",\"metrics_address\":", JsonQuote(info.metrics_address()),
                    ",\"registered_unix_ms\":", view.row.registered_unix_ms,
                    // Whole seconds: the groups' JSON then changes (and is sent) once a second at most.
                    ",\"last_heartbeat_age_s\":", JsonNumber(std::floor(view.last_heartbeat_age_s)));
    if (view.has_task) {
      const aviary::v1::TaskInfo& task = view.task;
      absl::StrAppend(&json, ",\"task_id\":", JsonQuote(task.task_id()), ",\"epoch\":", task.latest().epoch(),
                      ",\"epochs\":", task.epochs(), ",\"step\":", task.latest().step(),
                      ",\"samples_per_s\":", JsonNumber(task.latest().samples_per_s()));
    } else {
      json += ",\"task_id\":\"\",\"samples_per_s\":null";
    }
    // Rank 0's CUDA memory from the last heartbeat; null (shown as "not reported") on the CPU.
    absl::StrAppend(&json, ",\"gpu_memory_bytes\":",
                    view.gpu_memory_bytes > 0 ? absl::StrCat(view.gpu_memory_bytes) : std::string("null"), "}");
    first = false;
  }
  json += "]}";
  return json;
}

void Console::ServeGroups(Request& request) { request.Json(GroupsJson()); }

void Console::ServeCancel(Request& request, const std::string& job_id) {
  const std::string what = absl::StrCat("console POST /api/jobs/", job_id, "/cancel");
  absl::Status allowed = request.Authorize(*this, *auth_, what.c_str(), kClientOnly);
  if (!allowed.ok()) return request.Error(allowed);
  if (!IsJobId(job_id)) {
    return request.Error(absl::InvalidArgumentError(absl::StrCat(what, ": '", job_id, "' is not a job id")));
  }
  absl::StatusOr<aviary::v1::JobInfo> job = scheduler_->CancelJob(job_id);
  if (!job.ok()) return request.Error(job.status());
  // A job that ended meanwhile (the page's confirm dialog open) is answered as it is, not cancelled.
  if (job->state() == aviary::v1::JOB_STATE_CANCELLED) {
    log_.Info(absl::StrCat("job ", job_id, " cancelled from the console (role ", RoleName(request.role()), ")"));
  } else {
    log_.Info(absl::StrCat("job ", job_id, ": a cancel from the console found it ",
                           aviary::v1::JobState_Name(job->state()), "; nothing to cancel"));
  }
  request.Json(ProtoJson(*job));
}

void Console::StreamJob(Request& request, const std::string& job_id) {
  absl::StatusOr<aviary::v1::JobInfo> job = scheduler_->GetJob(job_id);
  if (!job.ok()) return request.Error(job.status());
  if (request.method() == "HEAD") return request.Reply(200, "text/event-stream", "");  // headers only
  StreamSlot slot(this, request.holders(*auth_, tls_front_ != nullptr));
  if (!slot.held()) return request.Error(slot.status());
  if (!request.StartStream()) return;
  bool alive = true;
  // A step point (progress within an epoch) comes at most once a second: each event carries the
  // whole job, and a sweep's groups reported steps many times a second (66 KB per event for a
  // 100-task sweep, per open page). A held-back step point is superseded by the next event (it
  // carries the job as it is then) or sent by the next tick; epoch ends and state changes go at
  // once (the page draws each epoch end).
  using Clock = std::chrono::steady_clock;
  constexpr auto kStepEvery = std::chrono::seconds(1);
  std::optional<aviary::v1::JobEvent> held;
  Clock::time_point last_sent{};
  const auto send = [&](const aviary::v1::JobEvent& event) {
    held.reset();
    last_sent = Clock::now();
    alive = request.StillAuthorized(*this, *auth_) && request.Event("job", ProtoJson(event));
    return alive;
  };
  absl::Status status = scheduler_->WatchJob(
      job_id,
      [&](const aviary::v1::JobEvent& event) {
        const bool step = event.has_metrics() && !event.metrics().epoch_end();
        if (step && Clock::now() - last_sent < kStepEvery) {
          held = event;
          return true;
        }
        return send(event);
      },
      [&] {
        if (stopping_) return true;
        if (held.has_value() && Clock::now() - last_sent >= kStepEvery) {
          const aviary::v1::JobEvent event = *std::move(held);
          if (!send(event)) return true;
        }
        alive = alive && request.StillAuthorized(*this, *auth_) && request.KeepAlive();
        return !alive;
      });
  // A finished job ends the stream; the page closes it rather than reconnecting.
  if (status.ok() && alive) request.Event("end", "{}");
}

void Console::StreamOverview(Request& request) {
  // ?topics=groups (the groups page), =jobs, =jobs,groups, or both (none given).
  const std::string topics = request.Query("topics");
  bool want_jobs = topics.empty(), want_groups = topics.empty();
  for (absl::string_view topic : absl::StrSplit(topics, ',', absl::SkipEmpty())) {
    if (topic == "jobs") {
      want_jobs = true;
    } else if (topic == "groups") {
      want_groups = true;
    } else {
      return request.Error(absl::InvalidArgumentError(
          absl::StrCat("/api/events?topics=", topics, ": '", topic, "' is not jobs or groups")));
    }
  }
  if (request.method() == "HEAD") return request.Reply(200, "text/event-stream", "");  // headers only
  StreamSlot slot(this, request.holders(*auth_, tls_front_ != nullptr));
  if (!slot.held()) return request.Error(slot.status());
  if (!request.StartStream()) return;
  Overview last;
  const auto changed = [](const std::shared_ptr<const std::string>& now,
                          const std::shared_ptr<const std::string>& before) {
    return before == nullptr || (now != before && *now != *before);
  };
  while (!stopping_) {
    // A token a reload removed ends the stream (the page then goes to the login form).
    if (!request.StillAuthorized(*this, *auth_)) return;
    const Overview now = OverviewJson();
    if (want_jobs && changed(now.jobs_shown, last.jobs_shown)) {
      if (!request.Event("jobs", *now.jobs)) return;
    }
    last.jobs_shown = now.jobs_shown;
    if (want_groups && changed(now.groups, last.groups)) {
      if (!request.Event("groups", *now.groups)) return;
    }
    last.groups = now.groups;
    if (!request.KeepAlive()) return;
    for (int i = 0; i < 10 && !stopping_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace aviary::coordinator
