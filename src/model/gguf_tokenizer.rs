//! A Hugging Face `tokenizers::Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata,
//! for models shipped without a tokenizer.json.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. llama.cpp picks its
//! pre-tokenizer regexes by the name in `tokenizer.ggml.pre` (src/llama-vocab.cpp,
//! `llm_tokenizer_bpe`); this module maps the names whose regexes it reproduces onto the equivalent
//! HF pre-tokenizers and refuses every other name, since a wrong split silently changes token ids.
//! llama.cpp applies its regexes one after another, each splitting every piece the previous one
//! left and keeping the unmatched stretches as pieces of their own: that is HF's `Split` with the
//! `Isolated` behaviour.
//!
//! ```no_run
//! use persona::model::{gguf::GgufFile, gguf_tokenizer::tokenizer_from_gguf};
//! let g = GgufFile::open(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let tok = tokenizer_from_gguf(&g)?;
//! let ids = tok.encode("Hello, world!", false).unwrap().get_ids().to_vec();
//! # Ok::<(), persona::Error>(())
//! ```

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, GgufValue};

/// The GPT-2 split (llama.cpp's form; HF's ByteLevel regex adds a final `|\s+`, which selects the
/// same pieces because llama.cpp keeps unmatched whitespace as a piece anyway).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3 (llama.cpp's case-insensitive contractions spelled out, as in llama-vocab.cpp).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but single digits.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// llama.cpp token types (tokenizer.ggml.token_type).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// How llama.cpp tokenizes for one `tokenizer.ggml.pre` name.
struct PreTokenizerSpec {
    pre: PreTokenizerWrapper,
    /// A piece that is itself a vocabulary entry is emitted whole (llama.cpp `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the file does not say.
    add_bos: bool,
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex `{regex}`: {e}")))?;
    Ok(s.into())
}

/// Byte-level mapping only (the split was done before).
fn byte_level_only() -> PreTokenizerWrapper {
    ByteLevel::new(false, false, false).into()
}

/// Byte-level mapping with HF's built-in GPT-2 split.
fn byte_level_gpt2() -> PreTokenizerWrapper {
    ByteLevel::new(false, false, true).into()
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name, following llama-vocab.cpp: the name → type
/// table in `llama_vocab::impl::load` and the type → regex table in `llm_tokenizer_bpe`.
fn pre_tokenizer_spec(name: &str) -> Result<Option<PreTokenizerSpec>> {
    let spec = |pre, ignore_merges, add_bos| PreTokenizerSpec { pre, ignore_merges, add_bos };
    Ok(Some(match name {
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing).
        "" | "default" => spec(
            Sequence::new(vec![
                split(r"[\p{P}\$\+<=>\^~\|]+")?,
                split(GPT2_REGEX)?,
                split(r"\p{N}+")?,
                split(r"[0-9][0-9][0-9]")?,
                byte_level_only(),
            ])
            .into(),
            false,
            false,
        ),
        // STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2:
        // `\p{N}` then the GPT-2 regex. HF's Digits(individual) splits on exactly \p{N}.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            spec(Sequence::new(vec![Digits::new(true).into(), byte_level_gpt2()]).into(), false, false)
        }
        // GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING: the GPT-2 regex alone.
        // ("gpt2" is not a llama.cpp name; accepted as an alias of "gpt-2".)
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            spec(byte_level_gpt2(), false, false)
        }
        // LLAMA3: ignore_merges and add_bos are set with the type.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => spec(Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level_only()]).into(), true, true),
        // DBRX, SMAUG: the Llama 3 regex without the Llama 3 flags.
        "dbrx" | "smaug-bpe" => spec(Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level_only()]).into(), false, false),
        // QWEN2, STABLELM2, HUNYUAN, SOLAR_OPEN.
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" => {
            spec(Sequence::new(vec![split(QWEN2_REGEX)?, byte_level_only()]).into(), false, false)
        }
        _ => return Ok(None),
    }))
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let bad = || Error::format(g.path(), format!("`{key}` must be an array of strings, found {}", describe(v)));
    let items = v.as_array().ok_or_else(bad)?;
    items.iter().map(|x| x.as_str().ok_or_else(bad)).collect::<Result<Vec<_>>>().map(Some)
}

fn describe(v: &GgufValue) -> String {
    match v.as_array() {
        Some(a) => format!("an array of {}", a.first().map_or("nothing", GgufValue::type_name)),
        None => format!("a {}", v.type_name()),
    }
}

fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
            _ => Err(Error::format(
                g.path(),
                format!("`{key}` = {v:?} is not a token id (vocabulary has {n_tokens} tokens)"),
            )),
        },
    }
}

/// Build the tokenizer described by `g`'s `tokenizer.ggml.*` metadata.
///
/// Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
/// tokens, so both are matched in raw text before BPE (as HF does; llama.cpp only does so for
/// control tokens when asked to parse special tokens). BOS/EOS are added by a post-processor when
/// `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (or llama.cpp's default for the
/// pre-tokenizer does, when they are absent).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let path = g.path();
    let model = g
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| Error::format(path, "no `tokenizer.ggml.model` metadata: the file carries no tokenizer"))?;
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: tokenizer model `{model}` (only `gpt2`, byte-level BPE, can be rebuilt from GGUF metadata)",
            path.display()
        )));
    }
    let pre_name = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let spec = pre_tokenizer_spec(pre_name)?.ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) cannot be reproduced; supported: \
             smollm, gpt-2, default, llama-bpe/llama3, qwen2 and llama.cpp's aliases of them",
            path.display()
        ))
    })?;

    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::format(path, "no `tokenizer.ggml.tokens` metadata"))?;
    let n = tokens.len();
    let mut vocab = Vocab::default();
    vocab.reserve(n);
    let mut texts = Vec::with_capacity(n);
    for (i, &t) in tokens.iter().enumerate() {
        // llama.cpp renames empty tokens so that every id has a distinct text.
        let text = if t.is_empty() { format!("[EMPTY_{i}]") } else { t.to_string() };
        if let Some(prev) = vocab.insert(text.clone(), i as u32) {
            return Err(Error::format(
                path,
                format!("duplicate token in tokenizer.ggml.tokens: `{text}` has ids {prev} and {i}"),
            ));
        }
        texts.push(text);
    }

    let merges = string_array(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| Error::format(path, "no `tokenizer.ggml.merges` metadata (needed by BPE)"))?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        // As llama.cpp: split at the first space after the first byte.
        let cut = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
        let Some(cut) = cut else {
            return Err(Error::format(
                path,
                format!("tokenizer.ggml.merges #{i} `{m}` is not two tokens separated by a space"),
            ));
        };
        pairs.push((m[..cut].to_string(), m[cut + 1..].to_string()));
    }

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("{}: building BPE from tokenizer.ggml.*: {e}", path.display())))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(spec.pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    if let Some(v) = g.get("tokenizer.ggml.token_type") {
        let types = v
            .as_array()
            .and_then(|a| a.iter().map(GgufValue::as_i64).collect::<Option<Vec<i64>>>())
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!("`tokenizer.ggml.token_type` must be an array of integers, found {}", describe(v)),
                )
            })?;
        if types.len() < n {
            return Err(Error::format(
                path,
                format!("tokenizer.ggml.token_type has {} entries for {n} tokens", types.len()),
            ));
        }
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            (0..n)
                .filter(|&i| types[i] == kind)
                .map(|i| AddedToken::from(texts[i].clone(), special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(&added(TOKEN_CONTROL, true));
        tok.add_tokens(&added(TOKEN_USER_DEFINED, false));
    }

    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(spec.add_bos);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    if add_bos || add_eos {
        let mut special = Vec::new();
        let (mut single, mut pair) = (Vec::new(), Vec::new());
        if add_bos {
            special.push(special_token(g, "[BOS]", "tokenizer.ggml.bos_token_id", &texts)?);
            single.push("[BOS]");
            pair.push("[BOS]");
        }
        single.push("$A");
        pair.push("$A");
        if add_eos {
            special.push(special_token(g, "[EOS]", "tokenizer.ggml.eos_token_id", &texts)?);
            single.push("[EOS]");
            pair.push("[EOS]");
        }
        // A pair repeats the single template for the second sequence (llama.cpp has no pairs).
        let second: Vec<&str> = single.iter().map(|&p| if p == "$A" { "$B:1" } else { p }).collect();
        pair.extend(second);
        let post = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .and_then(|b| b.try_pair(pair.join(" ")))
            .map_err(Error::Tokenizer)?
            .special_tokens(special)
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: post-processor: {e}", path.display())))?;
        tok.with_post_processor(Some(post));
    }
    Ok(tok)
}

/// `label` in the post-processor template stands for the token whose id is under `key`.
fn special_token(g: &GgufFile, label: &str, key: &str, texts: &[String]) -> Result<SpecialToken> {
    let id = token_id(g, key, texts.len())?
        .ok_or_else(|| Error::format(g.path(), format!("the tokenizer adds a {label} token but `{key}` is not set")))?;
    SpecialToken::new(label.to_string(), vec![id], vec![texts[id as usize].clone()])
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// The Jinja chat template stored in `tokenizer.chat_template`, if any.
pub fn gguf_chat_template(g: &GgufFile) -> Option<String> {
    g.get_str("tokenizer.chat_template").map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::write_gguf;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// The 256 byte-level characters, then `extra` tokens.
    fn vocab(extra: &[&str]) -> Vec<String> {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort();
        chars.iter().map(|c| c.to_string()).chain(extra.iter().map(|s| s.to_string())).collect()
    }

    fn strs(v: &[String]) -> GgufValue {
        GgufValue::Array(v.iter().map(|s| GgufValue::Str(s.clone())).collect())
    }

    /// A GGUF holding only tokenizer metadata: `extra` tokens after the byte alphabet, with
    /// token types (1 = normal), `merges`, and any further keys.
    fn gguf_with(
        extra: &[(&str, i32)],
        merges: &[&str],
        more: Vec<(&str, GgufValue)>,
    ) -> (tempfile::TempDir, GgufFile) {
        let names: Vec<&str> = extra.iter().map(|e| e.0).collect();
        let tokens = vocab(&names);
        let mut types = vec![GgufValue::I32(1); 256];
        types.extend(extra.iter().map(|e| GgufValue::I32(e.1)));
        let merges: Vec<String> = merges.iter().map(|s| s.to_string()).collect();
        let mut md = vec![
            ("tokenizer.ggml.model".to_string(), GgufValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), GgufValue::Str("smollm".into())),
            ("tokenizer.ggml.tokens".to_string(), strs(&tokens)),
            ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(types)),
            ("tokenizer.ggml.merges".to_string(), strs(&merges)),
        ];
        for (k, v) in more {
            match md.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v,
                None => md.push((k.to_string(), v)),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok.gguf");
        write_gguf(&p, &md, &[]).unwrap();
        let g = GgufFile::open(&p).unwrap();
        (dir, g)
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let (_d, g) = gguf_with(
            &[],
            &[],
            vec![
                ("tokenizer.ggml.pre", GgufValue::Str(pre.into())),
                ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
            ],
        );
        let tok = tokenizer_from_gguf(&g).unwrap();
        let mut s = PreTokenizedString::from(text);
        tok.get_pre_tokenizer().unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect()
    }

    #[test]
    fn pre_tokenizers_split_like_llama_cpp() {
        // Expected pieces worked out by hand from the regexes in llama-vocab.cpp.
        let text = "abc 1234 don't";
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(pieces("smollm", text), v(&["abc", "Ġ", "1", "2", "3", "4", "Ġdon", "'t"]));
        assert_eq!(pieces("gpt-2", text), v(&["abc", "Ġ1234", "Ġdon", "'t"]));
        assert_eq!(pieces("llama-bpe", text), v(&["abc", "Ġ", "123", "4", "Ġdon", "'t"]));
        assert_eq!(pieces("llama-bpe", "DON'T\n\nx"), v(&["DON", "'T", "ĊĊ", "x"]));
        assert_eq!(pieces("qwen2", text), v(&["abc", "Ġ", "1", "2", "3", "4", "Ġdon", "'t"]));
        // default: punctuation runs, then GPT-2, then digit runs, then groups of three digits.
        assert_eq!(pieces("default", "a+=b 1234!"), v(&["a", "+=", "b", "Ġ", "123", "4", "!"]));
    }

    #[test]
    fn encodes_merges_added_tokens_and_bos() {
        let extra = [("Ġt", 1), ("Ġth", 1), ("<|end|>", 3), ("<u>", 4), ("<s>", 3)];
        let (_d, g) = gguf_with(&extra, &["Ġ t", "Ġt h"], vec![]);
        let tok = tokenizer_from_gguf(&g).unwrap();
        let (th, end, user, bos) = (257, 258, 259, 260);
        let enc = tok.encode(" th<|end|><u>", true).unwrap();
        assert_eq!(enc.get_ids(), [th, end, user]);
        assert_eq!(tok.decode(&[th, end, user], false).unwrap(), " th<|end|><u>");
        assert_eq!(tok.decode(&[th, end, user], true).unwrap(), " th<u>");

        let more = vec![
            ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(bos)),
        ];
        let (_d, g) = gguf_with(&extra, &["Ġ t", "Ġt h"], more);
        let tok = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(tok.encode(" th", true).unwrap().get_ids(), [bos, th]);
        assert_eq!(tok.encode(" th", false).unwrap().get_ids(), [th]);
    }

    fn err(extra: &[(&str, i32)], merges: &[&str], more: Vec<(&str, GgufValue)>) -> String {
        let (_d, g) = gguf_with(extra, merges, more);
        tokenizer_from_gguf(&g).unwrap_err().to_string()
    }

    #[test]
    fn refuses_what_it_cannot_reproduce() {
        let e = err(&[], &[], vec![("tokenizer.ggml.model", GgufValue::Str("llama".into()))]);
        assert!(e.contains("unsupported") && e.contains("`llama`"), "{e}");
        let e = err(&[], &[], vec![("tokenizer.ggml.pre", GgufValue::Str("deepseek-llm".into()))]);
        assert!(e.contains("pre-tokenizer `deepseek-llm`") && e.contains("cannot be reproduced"), "{e}");
        let e = err(&[], &["Ġ zz"], vec![]);
        assert!(e.contains("zz"), "{e}");
        let e = err(&[], &["nospace"], vec![]);
        assert!(e.contains("merges #0"), "{e}");
        let e = err(&[("a", 1)], &[], vec![]);
        assert!(e.contains("duplicate token") && e.contains("`a`"), "{e}");
        let e = err(&[], &[], vec![("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))]);
        assert!(e.contains("bos_token_id"), "{e}");
        let e = err(&[], &[], vec![("tokenizer.ggml.tokens", GgufValue::U32(3))]);
        assert!(e.contains("tokenizer.ggml.tokens") && e.contains("array of strings"), "{e}");
        let e = err(&[], &[], vec![("tokenizer.ggml.token_type", GgufValue::Array(vec![]))]);
        assert!(e.contains("token_type has 0 entries"), "{e}");
    }

    #[test]
    fn chat_template_is_optional() {
        let (_d, g) = gguf_with(&[], &[], vec![]);
        assert_eq!(gguf_chat_template(&g), None);
        let t = GgufValue::Str("{{ messages }}".into());
        let (_d, g) = gguf_with(&[], &[], vec![("tokenizer.chat_template", t)]);
        assert_eq!(gguf_chat_template(&g).as_deref(), Some("{{ messages }}"));
    }
}
