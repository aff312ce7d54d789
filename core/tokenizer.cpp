// Tokenizers (core/tokenizer.h): the byte tokenizer, and GPT-2's byte-level BPE with its
// pre-tokenisation, a small parser for encoder.json, and the merges file.
//
// GPT-2 BPE in four steps:
//   1. pre-tokenise the text into words (gpt2_pretokenize: contractions, letter runs, number
//      runs, symbol runs, each with an optional leading space; whitespace runs)
//   2. each word starts as its bytes, each byte the id of its single-byte token
//   3. repeatedly merge every occurrence of the adjacent pair with the lowest merge rank
//   4. the ids left are the word's tokens
// The vocabulary files spell bytes in GPT-2's byte-to-unicode alphabet (printable bytes stand
// for themselves, the other 68 bytes are mapped to U+0100..U+0143); we translate them back to
// raw bytes at load time, so encoding and decoding work on plain bytes.
#include "core/tokenizer.h"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <climits>
#include <fstream>
#include <sstream>

#include "core/base/error.h"

namespace ulysses {

namespace {

// ---------------------------------------------------------------------------------------------
// UTF-8 and character classes

enum class CharClass : uint8_t { letter, number, space, other };

// Decodes the code point at s[i]; returns its length in bytes. Invalid or truncated sequences
// decode as one byte with *cp = UINT32_MAX.
size_t utf8_decode(std::string_view s, size_t i, uint32_t* cp) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t len;
  uint32_t v;
  if (c < 0x80) {
    *cp = c;
    return 1;
  } else if ((c & 0xE0) == 0xC0) {
    len = 2, v = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3, v = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4, v = c & 0x07;
  } else {
    *cp = UINT32_MAX;
    return 1;
  }
  if (i + len > s.size()) {
    *cp = UINT32_MAX;
    return 1;
  }
  for (size_t k = 1; k < len; k++) {
    const unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) {
      *cp = UINT32_MAX;
      return 1;
    }
    v = (v << 6) | (cc & 0x3F);
  }
  static constexpr uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < min_for_len[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) {
    *cp = UINT32_MAX;  // overlong, out of range or a surrogate
    return 1;
  }
  *cp = v;
  return len;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// Non-ASCII code points that are not letters: Unicode White_Space, the common decimal digit and
// number blocks (\p{N}), and punctuation, symbol, mark and format blocks (neither \p{L} nor
// \p{N}). Everything else above U+007F counts as a letter. Sorted, non-overlapping.
struct ClassRange {
  uint32_t lo, hi;
  CharClass cls;
};
constexpr CharClass S = CharClass::space, D = CharClass::number, O = CharClass::other;
constexpr ClassRange kClassRanges[] = {
    {0x0080, 0x0084, O}, {0x0085, 0x0085, S}, {0x0086, 0x009F, O}, {0x00A0, 0x00A0, S},
    {0x00A1, 0x00A9, O}, {0x00AB, 0x00B1, O}, {0x00B2, 0x00B3, D}, {0x00B4, 0x00B4, O},
    {0x00B6, 0x00B8, O}, {0x00B9, 0x00B9, D}, {0x00BB, 0x00BB, O}, {0x00BC, 0x00BE, D},
    {0x00BF, 0x00BF, O}, {0x00D7, 0x00D7, O}, {0x00F7, 0x00F7, O}, {0x0300, 0x036F, O},
    {0x037E, 0x037E, O}, {0x0387, 0x0387, O}, {0x0483, 0x0489, O}, {0x055A, 0x055F, O},
    {0x0589, 0x058A, O}, {0x0591, 0x05C7, O}, {0x05F3, 0x05F4, O}, {0x0600, 0x061F, O},
    {0x064B, 0x065F, O}, {0x0660, 0x0669, D}, {0x066A, 0x066D, O}, {0x0670, 0x0670, O},
    {0x06D4, 0x06D4, O}, {0x06F0, 0x06F9, D}, {0x07C0, 0x07C9, D}, {0x0964, 0x0965, O},
    {0x0966, 0x096F, D}, {0x09E6, 0x09EF, D}, {0x0A66, 0x0A6F, D}, {0x0AE6, 0x0AEF, D},
    {0x0B66, 0x0B6F, D}, {0x0BE6, 0x0BF2, D}, {0x0C66, 0x0C6F, D}, {0x0CE6, 0x0CEF, D},
    {0x0D66, 0x0D78, D}, {0x0DE6, 0x0DEF, D}, {0x0E50, 0x0E59, D}, {0x0ED0, 0x0ED9, D},
    {0x0F20, 0x0F33, D}, {0x1040, 0x1049, D}, {0x1090, 0x1099, D}, {0x1369, 0x137C, D},
    {0x1680, 0x1680, S}, {0x16EE, 0x16F0, D}, {0x17E0, 0x17E9, D}, {0x1810, 0x1819, D},
    {0x2000, 0x200A, S}, {0x200B, 0x2027, O}, {0x2028, 0x2029, S}, {0x202A, 0x202E, O},
    {0x202F, 0x202F, S}, {0x2030, 0x205E, O}, {0x205F, 0x205F, S}, {0x2060, 0x206F, O},
    {0x2070, 0x2070, D}, {0x2074, 0x2079, D}, {0x207A, 0x207E, O}, {0x2080, 0x2089, D},
    {0x208A, 0x208E, O}, {0x20A0, 0x214F, O}, {0x2150, 0x2182, D}, {0x2185, 0x2189, D},
    {0x218A, 0x245F, O}, {0x2460, 0x249B, D}, {0x249C, 0x24E9, O}, {0x24EA, 0x24FF, D},
    {0x2500, 0x2775, O}, {0x2776, 0x2793, D}, {0x2794, 0x2BFF, O}, {0x2E00, 0x2E7F, O},
    {0x3000, 0x3000, S}, {0x3001, 0x3004, O}, {0x3007, 0x3007, D}, {0x3008, 0x3020, O},
    {0x3021, 0x3029, D}, {0x302A, 0x3030, O}, {0x3036, 0x3037, O}, {0x3038, 0x303A, D},
    {0x303D, 0x303F, O}, {0x3099, 0x309C, O}, {0x30A0, 0x30A0, O}, {0x30FB, 0x30FB, O},
    {0xD800, 0xF8FF, O}, {0xFE00, 0xFE1F, O}, {0xFE30, 0xFE6F, O}, {0xFEFF, 0xFEFF, O},
    {0xFF01, 0xFF0F, O}, {0xFF10, 0xFF19, D}, {0xFF1A, 0xFF20, O}, {0xFF3B, 0xFF40, O},
    {0xFF5B, 0xFF65, O}, {0xFFE0, 0xFFFF, O}, {0x1D7CE, 0x1D7FF, D}, {0x1F000, 0x1FAFF, O},
    {0xE0000, 0xE007F, O}, {0xF0000, 0x10FFFF, O},
};

CharClass classify(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::letter;
    if (cp >= '0' && cp <= '9') return CharClass::number;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::space;
    return CharClass::other;
  }
  if (cp == UINT32_MAX) return CharClass::other;  // an invalid UTF-8 byte
  auto it = std::upper_bound(std::begin(kClassRanges), std::end(kClassRanges), cp,
                             [](uint32_t v, const ClassRange& r) { return v < r.lo; });
  if (it != std::begin(kClassRanges) && cp <= (it - 1)->hi) return (it - 1)->cls;
  return CharClass::letter;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> unicode alphabet

struct ByteAlphabet {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int, 324> cp_to_byte{};  // -1 where no byte maps there; code points < 324
  ByteAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; b++) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_cp[size_t(b)] = printable ? uint32_t(b) : next++;
      cp_to_byte[byte_to_cp[size_t(b)]] = b;
    }
  }
};

// Translates a token spelled in the byte alphabet back to raw bytes; false on a foreign char.
bool alphabet_to_bytes(const ByteAlphabet& a, std::string_view s, std::string* out,
                       uint32_t* bad_cp) {
  out->clear();
  for (size_t i = 0; i < s.size();) {
    uint32_t cp;
    i += utf8_decode(s, i, &cp);
    if (cp >= a.cp_to_byte.size() || a.cp_to_byte[cp] < 0) {
      *bad_cp = cp;
      return false;
    }
    *out += char(a.cp_to_byte[cp]);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// encoder.json: one flat JSON object {"string": integer, ...}

struct JsonEntry {
  std::string key;
  int64_t value;
  int line;
};

class FlatJsonParser {
 public:
  FlatJsonParser(std::string_view text, const std::string& path) : s_(text), path_(path) {}

  std::vector<JsonEntry> parse() {
    std::vector<JsonEntry> entries;
    skip_ws();
    expect('{', "'{' to open the object");
    skip_ws();
    if (peek() == '}') {
      pos_++;
    } else {
      for (;;) {
        skip_ws();
        JsonEntry e;
        e.line = line_;
        e.key = parse_string();
        skip_ws();
        expect(':', "':' after the key");
        skip_ws();
        e.value = parse_integer();
        entries.push_back(std::move(e));
        skip_ws();
        if (peek() == ',') {
          pos_++;
          continue;
        }
        expect('}', "',' or '}' after a value");
        break;
      }
    }
    skip_ws();
    if (pos_ != s_.size()) fail("expected the end of the file after the object");
    return entries;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    std::string found = pos_ < s_.size() ? fmt::format("'{}'", s_[pos_]) : "the end of the file";
    throw_user_error("{}:{}: {}, found {}", path_, line_, what, found);
  }
  int peek() const { return pos_ < s_.size() ? static_cast<unsigned char>(s_[pos_]) : -1; }
  void expect(char c, const char* what) {
    if (peek() != c) fail(fmt::format("expected {}", what));
    pos_++;
  }
  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      if (s_[pos_] == '\n') line_++;
      pos_++;
    }
  }
  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("expected 4 hex digits after \\u");
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
      const char c = s_[pos_];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else fail("expected 4 hex digits after \\u");
      pos_++;
    }
    return v;
  }
  std::string parse_string() {
    expect('"', "'\"' to open a string");
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail("expected '\"' to close the string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (c == '\n') {
        pos_--;
        fail("expected '\"' to close the string before the end of the line");
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) fail("expected an escape character after '\\'");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a surrogate pair spells one code point
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
              fail("expected a low surrogate \\uDC00-\\uDFFF after a high surrogate");
            pos_ += 2;
            const uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF)
              fail("expected a low surrogate \\uDC00-\\uDFFF after a high surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unexpected low surrogate");
          }
          utf8_append(out, cp);
          break;
        }
        default:
          pos_--;
          fail("expected one of \" \\ / b f n r t u after '\\'");
      }
    }
  }
  int64_t parse_integer() {
    const size_t start = pos_;
    bool negative = false;
    if (peek() == '-') negative = true, pos_++;
    if (peek() < '0' || peek() > '9') {
      pos_ = start;
      fail("expected an integer token id");
    }
    int64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      v = v * 10 + (s_[pos_++] - '0');
      if (v > INT32_MAX) {
        pos_ = start;
        fail("expected a token id below 2^31");
      }
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') fail("expected an integer token id");
    return negative ? -v : v;
  }

  std::string_view s_;
  const std::string& path_;
  size_t pos_ = 0;
  int line_ = 1;
};

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The first of `names` that exists in `dir`; a UserError naming all of them when none does.
std::string find_in_dir(const std::string& dir, std::initializer_list<const char*> names) {
  std::string tried;
  for (const char* n : names) {
    std::string p = dir + "/" + n;
    if (file_exists(p)) return p;
    tried += tried.empty() ? n : std::string(" or ") + n;
  }
  throw_user_error("{}: the GPT-2 tokenizer directory has no {}", dir, tried);
}

}  // namespace

// Reads a whole file; errors name it and say what it was for (`what`).
void check_readable_file(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_user_error("{}: {} not found (no such file)", path, what);
  if (S_ISDIR(st.st_mode)) throw_user_error("{}: is a directory, expected {}", path, what);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_user_error("{}: cannot open {} for reading", path, what);
}

std::string read_whole_file(const std::string& path, const std::string& what) {
  check_readable_file(path, what);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_user_error("{}: cannot open {} for reading", path, what);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw_user_error("{}: error while reading {}", path, what);
  return std::move(ss).str();
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenisation

std::vector<std::string_view> gpt2_pretokenize(std::string_view s) {
  std::vector<std::string_view> words;
  const size_t n = s.size();
  auto class_at = [&](size_t i, size_t* len) {
    uint32_t cp;
    *len = utf8_decode(s, i, &cp);
    return classify(cp);
  };
  size_t i = 0;
  while (i < n) {
    // 's 't 're 've 'm 'll 'd
    if (s[i] == '\'') {
      static constexpr std::string_view kSuffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
      size_t matched = 0;
      for (std::string_view suf : kSuffixes)
        if (s.substr(i + 1, suf.size()) == suf) {
          matched = 1 + suf.size();
          break;
        }
      if (matched) {
        words.push_back(s.substr(i, matched));
        i += matched;
        continue;
      }
    }
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
    size_t j = (s[i] == ' ') ? i + 1 : i;
    if (j < n) {
      size_t len;
      const CharClass c = class_at(j, &len);
      if (c != CharClass::space) {
        size_t k = j + len;
        while (k < n && class_at(k, &len) == c) k += len;
        words.push_back(s.substr(i, k - i));
        i = k;
        continue;
      }
    }
    // '\s+(?!\S)' then '\s+': a whitespace run, leaving its last character to the next word
    // when a non-space follows and the run is longer than one character.
    size_t k = i, last_start = i, count = 0, len;
    while (k < n && class_at(k, &len) == CharClass::space) {
      last_start = k;
      k += len;
      count++;
    }
    // s[i] is whitespace here: the letter/number/other branch took every other character.
    const size_t end = (k < n && count > 1) ? last_start : k;
    words.push_back(s.substr(i, end - i));
    i = end;
  }
  return words;
}

// ---------------------------------------------------------------------------------------------
// ByteTokenizer

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) {
  std::vector<int32_t> out(text.size());
  for (size_t i = 0; i < text.size(); i++) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string out;
  out.reserve(tokens.size());
  for (int32_t t : tokens) {
    if (t >= 0 && t < 256) out += char(t);
    else out += "\xEF\xBF\xBD";  // U+FFFD
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// GPT2Tokenizer

GPT2Tokenizer::GPT2Tokenizer(const std::string& dir) {
  const ByteAlphabet alphabet;
  const std::string vocab_path = find_in_dir(dir, {"encoder.json", "vocab.json"});
  const std::string merges_path = find_in_dir(dir, {"vocab.bpe", "merges.txt"});

  // Vocabulary: id -> raw bytes.
  const std::string vocab_text = read_whole_file(vocab_path, "a GPT-2 vocabulary (JSON object)");
  std::vector<JsonEntry> entries = FlatJsonParser(vocab_text, vocab_path).parse();
  if (entries.empty()) throw_user_error("{}: the vocabulary is empty", vocab_path);
  int64_t max_id = 0;
  for (const JsonEntry& e : entries) {
    if (e.value < 0)
      throw_user_error("{}:{}: token id {} is negative, expected >= 0", vocab_path, e.line, e.value);
    max_id = std::max(max_id, e.value);
  }
  if (max_id >= int64_t(entries.size()) * 2 + 1024)
    throw_user_error("{}: token ids reach {} but there are only {} tokens", vocab_path, max_id,
                     entries.size());
  id_to_bytes_.assign(size_t(max_id) + 1, std::string());
  std::vector<bool> present(size_t(max_id) + 1, false);
  std::string bytes;
  for (const JsonEntry& e : entries) {
    uint32_t bad = 0;
    if (!alphabet_to_bytes(alphabet, e.key, &bytes, &bad))
      throw_user_error("{}:{}: token \"{}\" has the character U+{:04X}, which is not in GPT-2's "
                       "byte alphabet",
                       vocab_path, e.line, e.key, bad);
    if (present[size_t(e.value)])
      throw_user_error("{}:{}: token id {} is used twice", vocab_path, e.line, e.value);
    if (!bytes_to_id_.emplace(bytes, int32_t(e.value)).second)
      throw_user_error("{}:{}: token \"{}\" appears twice", vocab_path, e.line, e.key);
    present[size_t(e.value)] = true;
    id_to_bytes_[size_t(e.value)] = bytes;
  }
  for (int b = 0; b < 256; b++) {
    auto it = bytes_to_id_.find(std::string(1, char(b)));
    if (it == bytes_to_id_.end()) {
      std::string spelled;
      utf8_append(spelled, alphabet.byte_to_cp[size_t(b)]);
      throw_user_error("{}: has no token for the byte 0x{:02X} (spelled \"{}\"); a byte-level "
                       "BPE vocabulary needs all 256",
                       vocab_path, b, spelled);
    }
    byte_id_[b] = it->second;
  }
  if (auto it = bytes_to_id_.find("<|endoftext|>"); it != bytes_to_id_.end()) eot_ = it->second;

  // Merges: rank = order in the file.
  const std::string merges_text = read_whole_file(merges_path, "a BPE merges file");
  std::istringstream lines(merges_text);
  std::string line, a, b;
  int line_no = 0;
  int32_t rank = 0;
  while (std::getline(lines, line)) {
    line_no++;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == line.size() ||
        line.find(' ', sp + 1) != std::string::npos)
      throw_user_error("{}:{}: expected two tokens separated by one space, found \"{}\"",
                       merges_path, line_no, line);
    uint32_t bad = 0;
    if (!alphabet_to_bytes(alphabet, std::string_view(line).substr(0, sp), &a, &bad) ||
        !alphabet_to_bytes(alphabet, std::string_view(line).substr(sp + 1), &b, &bad))
      throw_user_error("{}:{}: \"{}\" has the character U+{:04X}, which is not in GPT-2's byte "
                       "alphabet",
                       merges_path, line_no, line, bad);
    auto ia = bytes_to_id_.find(a), ib = bytes_to_id_.find(b), iab = bytes_to_id_.find(a + b);
    if (ia == bytes_to_id_.end() || ib == bytes_to_id_.end() || iab == bytes_to_id_.end())
      throw_user_error("{}:{}: the merge \"{}\" needs tokens that {} does not have", merges_path,
                       line_no, line, vocab_path);
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    merges_.emplace(key, std::make_pair(rank++, iab->second));  // first (lowest) rank wins
  }
}

std::vector<int32_t> GPT2Tokenizer::bpe(std::string_view word) {
  std::string key(word);
  if (auto it = cache_.find(key); it != cache_.end()) return it->second;

  std::vector<int32_t> ids(word.size());
  for (size_t i = 0; i < word.size(); i++) ids[i] = byte_id_[static_cast<unsigned char>(word[i])];
  std::vector<int32_t> merged;
  while (ids.size() >= 2) {
    int32_t best_rank = INT32_MAX, best_id = -1;
    uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < ids.size(); i++) {
      const uint64_t k = (uint64_t(uint32_t(ids[i])) << 32) | uint32_t(ids[i + 1]);
      auto it = merges_.find(k);
      if (it != merges_.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best_key = k;
      }
    }
    if (best_id < 0) break;
    // Merge every occurrence of the best pair, left to right.
    merged.clear();
    for (size_t i = 0; i < ids.size();) {
      if (i + 1 < ids.size() &&
          ((uint64_t(uint32_t(ids[i])) << 32) | uint32_t(ids[i + 1])) == best_key) {
        merged.push_back(best_id);
        i += 2;
      } else {
        merged.push_back(ids[i++]);
      }
    }
    ids.swap(merged);
  }
  if (cache_.size() >= (1u << 18)) cache_.clear();  // bound the memory on endless distinct words
  cache_.emplace(std::move(key), ids);
  return ids;
}

std::vector<int32_t> GPT2Tokenizer::encode(std::string_view text) {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  for (std::string_view word : gpt2_pretokenize(text)) {
    std::vector<int32_t> ids = bpe(word);
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

std::string GPT2Tokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string out;
  for (int32_t t : tokens) {
    if (t >= 0 && size_t(t) < id_to_bytes_.size() && !id_to_bytes_[size_t(t)].empty())
      out += id_to_bytes_[size_t(t)];
    else
      out += "\xEF\xBF\xBD";  // U+FFFD: not a token
  }
  return out;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& dir,
                                          const std::string& key) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "gpt2") {
    if (dir.empty())
      throw_user_error("{} is gpt2: it needs a tokenizer directory holding encoder.json (or "
                       "vocab.json) and vocab.bpe (or merges.txt)",
                       key);
    return std::make_unique<GPT2Tokenizer>(dir);
  }
  throw_user_error("{} is '{}', expected byte or gpt2", key, kind);
}

}  // namespace ulysses
