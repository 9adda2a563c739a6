// errors.hpp — kto's errors in the words of the Python API.
//
// The library names its own entry points and parameters: kto::cpu::step_forward,
// 'sequences.offsets[2]', 'options.beta', 'policy_logits', row 4 of a flat row
// index. A Python caller knows kto_torch.kto_loss, 'offsets[2]', 'beta', 'logits'
// and logits[1, 1]. Every entry point runs its checks and its library call under
// a Names (the public Python function, and for each library parameter the
// Python argument and the leading shape of the tensor it came from); a kto::Error
// leaving it is rethrown as the same class (sequence and row kept) with the
// function, the argument and the message in the caller's words: flat row indices
// become indices of the caller's tensor (targets[1, 2] for [2, 3] targets). The
// pybind11 translator then raises kto_torch's classes (kto_torch/_errors.py).
//
// The CUDA wrapper (kto_torch_cuda.h) returns the library's messages as strings;
// cuda_ops.hpp turns one back into a kto::Error for the same translation.
//
// This header, operands.hpp, cpu_ops.hpp and cuda_ops.hpp form one translation
// unit per extension module (kto_torch.cpp includes them): everything is internal
// to it, so the per-ISA copies of the CPU ops never share a symbol.
#pragma once

#include <torch/extension.h>

#include <kto/error.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <exception>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace kto_torch {
namespace {

template <class... Args>
std::string text(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

std::string shape_of(const torch::Tensor& t) {
  return text(t.sizes());
}

/// kto_torch.KTOError (a ValueError) "<fn>: argument '<name>' must <expectation>; got <got>".
void require(bool ok, const char* fn, const std::string& name, const std::string& expectation,
             const std::string& got) {
  if (!ok)
    throw kto::Error(fn, name,
                     text(fn, ": argument '", name, "' must ", expectation, "; got ", got));
}

/// A library parameter as the caller named it: `python`, and the leading shape that a flat
/// index into it runs over (a [B, T] targets tensor, the [B, T] rows of [B, T, V] logits).
struct Alias {
  std::string library;        ///< "sequences", "policy_logits", "kl.policy_logp", "head.weight"
  std::string python;         ///< "offsets", "logits", "kl_policy_logp", "weight"
  std::vector<int64_t> dims;  ///< fewer than 2: indices are kept as they are
};

/// The leading dimensions of a tensor (all but its last `drop`): what a row index runs over.
std::vector<int64_t> leading_dims(const torch::Tensor& t, int64_t drop) {
  const auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end() - std::min<int64_t>(drop, t.dim()));
}

/// "i" over `dims` as "i0, i1, ...", row-major (dims of fewer than 2 entries: "i").
std::string unravel(int64_t flat, const std::vector<int64_t>& dims) {
  if (dims.size() < 2 || flat < 0) return std::to_string(flat);
  std::vector<int64_t> index(dims.size());
  for (size_t k = dims.size(); k-- > 0;) {
    const int64_t n = std::max<int64_t>(dims[k], 1);
    index[k] = k == 0 ? flat : flat % n;
    flat /= n;
  }
  std::string out;
  for (size_t k = 0; k < index.size(); ++k) out += (k ? ", " : "") + std::to_string(index[k]);
  return out;
}

bool name_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.';
}

/// Translates the library's errors for one call of a public Python function.
class Names {
 public:
  Names(const char* fn, std::vector<Alias> aliases) : fn_(fn), aliases_(std::move(aliases)) {}

  /// Runs `f`; a kto::Error leaving it is rethrown in the Python API's words.
  template <class F>
  auto run(F&& f) const -> decltype(f()) {
    try {
      return f();
    } catch (const kto::NonFiniteLogitsError& e) {
      const std::string argument = python_argument(e.argument());
      throw kto::NonFiniteLogitsError(fn_, argument, e.sequence(), e.row(),
                                      message(e, argument, e.row()));
    } catch (const kto::PeerError& e) {
      throw kto::PeerError(fn_, e.failed_ranks(), message(e, e.argument()));
    } catch (const kto::Error& e) {
      const std::string argument = python_argument(e.argument());
      throw kto::Error(fn_, argument, message(e, argument));
    }
  }

 private:
  const Alias* find(const std::string& base) const {
    // The longest library name that is `base` or a field of it ("hidden" for "hidden.cols").
    const Alias* best = nullptr;
    for (const Alias& a : aliases_) {
      const auto n = a.library.size();
      const bool match = base.compare(0, n, a.library) == 0 &&
                         (base.size() == n || base[n] == '.' || base[n] == '[');
      if (match && (best == nullptr || n > best->library.size())) best = &a;
    }
    return best;
  }

  /// A name with an optional index ("targets[5]", "sequences.offsets[2]", "options.beta",
  /// "hidden[3, 1]") as the caller's: the Python argument, the index over its shape; a
  /// field of a parameter ("hidden.cols") kept as a field of the argument with `field`.
  std::string python_name(const std::string& name, bool field) const {
    const auto bracket = name.find('[');
    const std::string base = name.substr(0, bracket);
    std::string python = base;
    std::vector<int64_t> dims;
    if (const Alias* a = find(base)) {
      python = a->python + (field ? base.substr(a->library.size()) : "");
      dims = a->dims;
    } else if (base.rfind("options.", 0) == 0 || base.rfind("config.", 0) == 0) {
      python = base.substr(base.find('.') + 1);  // the keyword argument of that name
    }
    if (bracket == std::string::npos) return python;
    const auto close = name.find(']', bracket);
    const std::string inside = name.substr(bracket + 1, close - bracket - 1);
    const auto comma = inside.find(',');
    const std::string first = inside.substr(0, comma);
    std::string index = inside;
    if (!first.empty() && first.find_first_not_of("0123456789") == std::string::npos)
      index = unravel(std::stoll(first), dims) +
              (comma == std::string::npos ? "" : inside.substr(comma));
    return python + "[" + index + "]" + (close == std::string::npos ? "" : name.substr(close + 1));
  }

  std::string python_argument(const std::string& argument) const {
    return argument.empty() ? argument : python_name(argument, false);
  }

  /// The message's own words: library names (indexed or not, "options." fields) as the
  /// caller's, and for a non-finite row its position in the anchor tensor.
  std::string body(const std::string& s, int64_t row) const {
    std::string out;
    size_t i = 0;
    while (i < s.size()) {
      const bool starts = (std::isalpha(static_cast<unsigned char>(s[i])) || s[i] == '_') &&
                          (i == 0 || !name_char(s[i - 1]));
      if (!starts) {
        out += s[i++];
        continue;
      }
      size_t j = i;
      while (j < s.size() && name_char(s[j])) ++j;
      while (j > i && s[j - 1] == '.') --j;  // a full stop ends a sentence, not a name
      std::string word = s.substr(i, j - i);
      if (j < s.size() && s[j] == '[') {
        const auto close = s.find(']', j);
        if (close != std::string::npos) {
          word = s.substr(i, close + 1 - i);
          j = close + 1;
        }
      }
      // Code, not prose: a parameter with a field, an index or an underscore.
      const bool code = word.find_first_of(".[_") != std::string::npos;
      const bool known =
          find(word.substr(0, word.find('['))) != nullptr || word.rfind("options.", 0) == 0;
      out += code && known ? python_name(word, true) : word;
      i = j;
    }
    if (row >= 0 && !aliases_.empty() && aliases_.front().dims.size() >= 2) {
      const Alias& anchor = aliases_.front();
      const std::string needle = text("row ", row);
      auto at = out.find(needle);
      while (at != std::string::npos && at + needle.size() < out.size() &&
             std::isdigit(static_cast<unsigned char>(out[at + needle.size()])))
        at = out.find(needle, at + 1);  // "row 1" is not "row 12"
      const bool named = out.find(anchor.python + "[") != std::string::npos;
      if (at != std::string::npos && !named)
        out.insert(at + needle.size(),
                   text(" (", anchor.python, "[", unravel(row, anchor.dims), "])"));
    }
    return out;
  }

  /// "<fn>: argument '<argument>' <the library's words after its own argument>".
  std::string message(const kto::Error& e, const std::string& argument, int64_t row = -1) const {
    const std::string what = e.what();
    const std::string head = "argument '" + e.argument() + "'";
    const auto at = e.argument().empty() ? std::string::npos : what.find(head);
    if (at != std::string::npos)
      return text(fn_, ": argument '", argument, "'", body(what.substr(at + head.size()), row));
    std::string rest = what;
    if (rest.rfind(e.function() + ": ", 0) == 0) rest = rest.substr(e.function().size() + 2);
    return text(fn_, ": ", body(rest, row));
  }

  const char* fn_;
  std::vector<Alias> aliases_;
};

/// Raises kto_torch._errors.<name>(message) with the error's attributes set.
void raise_python(const char* name, const kto::Error& e,
                  const std::vector<std::pair<const char*, pybind11::object>>& extra = {}) {
  pybind11::object cls = pybind11::module_::import("kto_torch._errors").attr(name);
  pybind11::object error = cls(e.what());
  error.attr("function") = e.function();
  error.attr("argument") = e.argument();
  for (const auto& [key, value] : extra) error.attr(key) = value;
  PyErr_SetObject(cls.ptr(), error.ptr());
}

/// The library's errors as kto_torch's exception classes (kto_torch/_errors.py).
void translate_kto_errors(std::exception_ptr p) {
  if (!p) return;
  try {
    std::rethrow_exception(p);
  } catch (const kto::NonFiniteLogitsError& e) {
    raise_python("NonFiniteLogitsError", e,
                 {{"sequence", pybind11::int_(e.sequence())}, {"row", pybind11::int_(e.row())}});
  } catch (const kto::PeerError& e) {
    raise_python("PeerError", e);
  } catch (const kto::Error& e) {
    raise_python("KTOError", e);
  }
}

}  // namespace
}  // namespace kto_torch
