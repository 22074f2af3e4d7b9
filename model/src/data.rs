//! Training data sources and the deterministic batch sampler.
//!
//! Sources: byte-level text files (token = byte), text files tokenized at open with an HF `tokenizer.json`
//! (through the `tokenizers` crate, kept in memory), pre-tokenized raw little-endian uint16/uint32 token files
//! (memory-mapped), and a built-in synthetic source with learnable structure (a fixed random first-order Markov
//! chain over an active sub-vocabulary, optionally skewed so that a few hot tokens dominate and routing becomes
//! unbalanced). Every file source is checked once at open: it must be non-empty and every token id must be
//! below the model's vocabulary, otherwise the error names the file and the offending position.
//!
//! Invariant: a batch is a pure function of (seed, step, data-parallel rank, micro-batch index, batch size,
//! sequence length) and the source's contents, so a resumed or re-partitioned run sees exactly the same tokens.

use crate::{ModelError, Result};
use std::path::{Path, PathBuf};

/// What to train on (the serializable description; [`DataSource::open`] turns it into a source).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSpec {
    /// A text file read as bytes: token id = byte value (needs a vocabulary of at least the largest byte + 1).
    Text {
        /// The file.
        path: PathBuf,
    },
    /// A UTF-8 text file tokenized with an HF `tokenizer.json` when the source is opened (no special tokens
    /// added; the text is encoded in pieces that end at line breaks).
    TextTokenized {
        /// The text file.
        path: PathBuf,
        /// The `tokenizer.json`.
        tokenizer: PathBuf,
    },
    /// A headerless file of little-endian token ids.
    Tokens {
        /// The file.
        path: PathBuf,
        /// Width of each id.
        dtype: TokenDtype,
    },
    /// The built-in synthetic source.
    Synthetic(SyntheticSpec),
}

/// Width of the ids in a pre-tokenized file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Two bytes per token.
    U16,
    /// Four bytes per token.
    U32,
}

impl TokenDtype {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// Parameters of the synthetic source.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Shape of the distribution.
    pub variant: SyntheticVariant,
    /// Number of distinct tokens used (capped at the vocabulary); 0 means min(vocab, 256).
    pub active_vocab: usize,
    /// Seed of the fixed chain (the sampling seed is separate, so runs with different seeds see the same task).
    pub chain_seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            variant: SyntheticVariant::Markov,
            active_vocab: 0,
            chain_seed: 0,
        }
    }
}

/// The synthetic distributions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticVariant {
    /// Each token has 4 successors with probabilities 0.55/0.25/0.12/0.08 (conditional entropy ≈ 1.13 nats).
    #[default]
    Markov,
    /// As `Markov`, but 75% of the time the next token is one of 4 hot tokens (chosen by the current token),
    /// so a few tokens dominate every batch and a fresh router sends most tokens to the same experts.
    Skewed,
}

/// Successor probabilities of the Markov chain (cumulative form is built at open).
const SUCCESSOR_PROBS: [f64; 4] = [0.55, 0.25, 0.12, 0.08];
/// Number of hot tokens and the probability of jumping to one in the skewed variant.
const HOT_TOKENS: usize = 4;
const HOT_PROB: f64 = 0.75;

/// Identifies one micro-batch of one data-parallel rank in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BatchKey {
    /// Run seed.
    pub seed: u64,
    /// Optimizer step (0-based).
    pub step: u64,
    /// Data-parallel rank.
    pub dp_rank: u32,
    /// Micro-batch index within the rank's step.
    pub micro: u32,
}

/// A [B, T+1] block of token ids: inputs are `[.., :T]`, targets `[.., 1:]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// Number of sequences B.
    pub batch: usize,
    /// Tokens per row, T + 1.
    pub row_len: usize,
    /// Row-major ids, B·(T+1) of them.
    pub tokens: Vec<u32>,
}

impl TokenBatch {
    /// Row `b`.
    pub fn row(&self, b: usize) -> &[u32] {
        &self.tokens[b * self.row_len..(b + 1) * self.row_len]
    }
}

/// An opened, validated source.
#[derive(Debug)]
pub enum DataSource {
    /// A memory-mapped file of byte tokens or u16/u32 ids.
    File(FileSource),
    /// A tokenized text file.
    Tokenized(TokenizedSource),
    /// The synthetic chain.
    Synthetic(SyntheticSource),
}

/// A memory-mapped token file.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    /// Bytes per id: 1 (text), 2 or 4.
    width: usize,
    map: memmap2::Mmap,
}

impl FileSource {
    /// Number of tokens in the file.
    pub fn n_tokens(&self) -> usize {
        self.map.len() / self.width
    }

    fn token(&self, i: usize) -> u32 {
        let b = &self.map[i * self.width..(i + 1) * self.width];
        match self.width {
            1 => u32::from(b[0]),
            2 => u32::from(u16::from_le_bytes([b[0], b[1]])),
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// A text file's token ids, produced by a tokenizer at open.
#[derive(Debug, Clone)]
pub struct TokenizedSource {
    path: PathBuf,
    tokens: Vec<u32>,
}

impl TokenizedSource {
    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The ids, in text order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Text pieces handed to the tokenizer at a time end at a line break after at least this many bytes.
const TOKENIZE_PIECE: usize = 1 << 20;

/// The synthetic chain with its fixed transition table.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    variant: SyntheticVariant,
    /// Token id of each active index.
    ids: Vec<u32>,
    /// Four successor indices per active index.
    successors: Vec<[u32; 4]>,
    /// Two hot successor indices per active index (skewed variant).
    hot_successors: Vec<[u32; 2]>,
}

fn bad_data(path: &Path, reason: String) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    }
}

impl DataSource {
    /// Opens and validates `spec` for a model with `vocab` tokens.
    pub fn open(spec: &DataSpec, vocab: usize) -> Result<DataSource> {
        match spec {
            DataSpec::Text { path } => Ok(DataSource::File(open_file(path, 1, vocab)?)),
            DataSpec::TextTokenized { path, tokenizer } => Ok(DataSource::Tokenized(
                open_tokenized(path, tokenizer, vocab)?,
            )),
            DataSpec::Tokens { path, dtype } => {
                Ok(DataSource::File(open_file(path, dtype.width(), vocab)?))
            }
            DataSpec::Synthetic(s) => Ok(DataSource::Synthetic(SyntheticSource::new(s, vocab)?)),
        }
    }

    /// The [B, T+1] tokens of micro-batch `key` (see the module invariant).
    pub fn sample(&self, key: BatchKey, batch: usize, seq_len: usize) -> Result<TokenBatch> {
        let row_len = seq_len + 1;
        let mut tokens = Vec::with_capacity(batch * row_len);
        match self {
            DataSource::File(f) => sample_windows(
                &f.path,
                f.n_tokens(),
                |i| f.token(i),
                key,
                batch,
                row_len,
                &mut tokens,
            )?,
            DataSource::Tokenized(t) => sample_windows(
                &t.path,
                t.tokens.len(),
                |i| t.tokens[i],
                key,
                batch,
                row_len,
                &mut tokens,
            )?,
            DataSource::Synthetic(s) => {
                for b in 0..batch {
                    let mut rng = SplitMix::new(row_seed(key, b));
                    s.walk(&mut rng, row_len, &mut tokens);
                }
            }
        }
        Ok(TokenBatch {
            batch,
            row_len,
            tokens,
        })
    }
}

/// Appends `batch` windows of `row_len` consecutive tokens of an `n`-token sequence, each starting at a
/// position drawn from the row's seed.
fn sample_windows(
    path: &Path,
    n: usize,
    token: impl Fn(usize) -> u32,
    key: BatchKey,
    batch: usize,
    row_len: usize,
    out: &mut Vec<u32>,
) -> Result<()> {
    if n < row_len {
        return Err(bad_data(
            path,
            format!("has {n} tokens, fewer than one sequence of {row_len} (seq_len + 1)"),
        ));
    }
    let starts = (n - row_len + 1) as u64;
    for b in 0..batch {
        let mut rng = SplitMix::new(row_seed(key, b));
        let start = (rng.next() % starts) as usize;
        out.extend((start..start + row_len).map(&token));
    }
    Ok(())
}

/// Reads `path` as UTF-8 and encodes it with the tokenizer in `tokenizer_path`; every id must be below
/// `vocab`.
fn open_tokenized(path: &Path, tokenizer_path: &Path, vocab: usize) -> Result<TokenizedSource> {
    let _span = tracing::info_span!("tokenize", path = %path.display()).entered();
    let tok = tokenizers::Tokenizer::from_file(tokenizer_path).map_err(|e| {
        bad_data(
            tokenizer_path,
            format!("is not a usable HF tokenizer.json: {e}"),
        )
    })?;
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        bad_data(
            path,
            format!(
                "is not UTF-8 (byte {}); use a byte-level text source",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.is_empty() {
        return Err(bad_data(path, "is empty".into()));
    }
    let mut tokens = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        // Cut after the first line break at or beyond the piece size (or take the rest).
        let cut = if rest.len() <= TOKENIZE_PIECE {
            rest.len()
        } else {
            rest.as_bytes()[TOKENIZE_PIECE..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| TOKENIZE_PIECE + i + 1)
        };
        let (piece, tail) = rest.split_at(cut);
        let enc = tok.encode(piece, false).map_err(|e| {
            bad_data(
                path,
                format!(
                    "could not be tokenized with {}: {e}",
                    tokenizer_path.display()
                ),
            )
        })?;
        tokens.extend_from_slice(enc.get_ids());
        rest = tail;
    }
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(bad_data(
            path,
            format!(
                "token id {t} at position {i} (from {}) is not below the vocabulary size {vocab}",
                tokenizer_path.display()
            ),
        ));
    }
    if tokens.is_empty() {
        return Err(bad_data(path, "tokenizes to no tokens".into()));
    }
    Ok(TokenizedSource {
        path: path.to_path_buf(),
        tokens,
    })
}

fn open_file(path: &Path, width: usize, vocab: usize) -> Result<FileSource> {
    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(bad_data(path, "is empty".into()));
    }
    if len % width as u64 != 0 {
        return Err(bad_data(
            path,
            format!("length {len} is not a multiple of the token width {width}"),
        ));
    }
    // SAFETY: the map is read-only and the file is opened read-only; training data must not be modified while
    // a run reads it (a concurrent truncation would be a bus error, as with any mmap reader).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let src = FileSource {
        path: path.to_path_buf(),
        width,
        map,
    };
    for i in 0..src.n_tokens() {
        let t = src.token(i);
        if t as usize >= vocab {
            return Err(bad_data(
                path,
                format!("token id {t} at position {i} is not below the vocabulary size {vocab}"),
            ));
        }
    }
    Ok(src)
}

impl SyntheticSource {
    fn new(spec: &SyntheticSpec, vocab: usize) -> Result<SyntheticSource> {
        let active = if spec.active_vocab == 0 {
            vocab.min(256)
        } else {
            spec.active_vocab.min(vocab)
        };
        if active < HOT_TOKENS.max(SUCCESSOR_PROBS.len()) {
            return Err(ModelError::Input(format!(
                "synthetic data needs at least {} active tokens, the vocabulary gives {active}",
                HOT_TOKENS.max(SUCCESSOR_PROBS.len())
            )));
        }
        let mut rng = SplitMix::new(spec.chain_seed ^ 0x5eed_c4a1_0000_0001);
        // A random injective map from active indices to token ids (partial Fisher-Yates).
        let mut perm: Vec<u32> = (0..vocab as u32).collect();
        for i in 0..active {
            let j = i + (rng.next() % (vocab - i) as u64) as usize;
            perm.swap(i, j);
        }
        let ids = perm[..active].to_vec();
        let pick = |rng: &mut SplitMix| (rng.next() % active as u64) as u32;
        let successors = (0..active)
            .map(|_| {
                [
                    pick(&mut rng),
                    pick(&mut rng),
                    pick(&mut rng),
                    pick(&mut rng),
                ]
            })
            .collect();
        let hot = |rng: &mut SplitMix| (rng.next() % HOT_TOKENS as u64) as u32;
        let hot_successors = (0..active)
            .map(|_| [hot(&mut rng), hot(&mut rng)])
            .collect();
        Ok(SyntheticSource {
            variant: spec.variant,
            ids,
            successors,
            hot_successors,
        })
    }

    /// Appends one walk of `len` tokens.
    fn walk(&self, rng: &mut SplitMix, len: usize, out: &mut Vec<u32>) {
        let active = self.ids.len() as u64;
        let mut cur = (rng.next() % active) as usize;
        for _ in 0..len {
            out.push(self.ids[cur]);
            let mut u = rng.uniform();
            if self.variant == SyntheticVariant::Skewed {
                if u < HOT_PROB {
                    let k = usize::from(u < HOT_PROB / 2.0);
                    cur = self.hot_successors[cur][k] as usize;
                    continue;
                }
                u = (u - HOT_PROB) / (1.0 - HOT_PROB);
            }
            let mut k = SUCCESSOR_PROBS.len() - 1;
            let mut acc = 0.0;
            for (i, p) in SUCCESSOR_PROBS.iter().enumerate() {
                acc += p;
                if u < acc {
                    k = i;
                    break;
                }
            }
            cur = self.successors[cur][k] as usize;
        }
    }

    /// The conditional entropy of the next token in nats (the best achievable cross-entropy for the Markov
    /// variant, ignoring the first token of a row, up to collisions between successors).
    pub fn entropy_nats(&self) -> f64 {
        SUCCESSOR_PROBS.iter().map(|p| -p * p.ln()).sum()
    }
}

/// Seed of row `b` of micro-batch `key`: a hash of every coordinate.
fn row_seed(key: BatchKey, b: usize) -> u64 {
    let mut h = SplitMix::new(key.seed).next();
    for v in [
        key.step,
        u64::from(key.dp_rank),
        u64::from(key.micro),
        b as u64,
    ] {
        h = SplitMix::new(h ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next();
    }
    h
}

/// splitmix64: a tiny, well-mixed deterministic generator.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(step: u64, micro: u32) -> BatchKey {
        BatchKey {
            seed: 7,
            step,
            dp_rank: 0,
            micro,
        }
    }

    #[test]
    fn synthetic_is_deterministic_and_structured() {
        let spec = DataSpec::Synthetic(SyntheticSpec::default());
        let a = DataSource::open(&spec, 1024).unwrap();
        let b = DataSource::open(&spec, 1024).unwrap();
        let x = a.sample(key(3, 1), 4, 16).unwrap();
        assert_eq!(x, b.sample(key(3, 1), 4, 16).unwrap());
        assert_eq!((x.batch, x.row_len, x.tokens.len()), (4, 17, 68));
        assert_ne!(x, a.sample(key(4, 1), 4, 16).unwrap());
        assert_ne!(x, a.sample(key(3, 0), 4, 16).unwrap());
        let other_rank = a
            .sample(
                BatchKey {
                    dp_rank: 1,
                    ..key(3, 1)
                },
                4,
                16,
            )
            .unwrap();
        assert_ne!(x, other_rank);
        // Every transition is one of the source token's 4 successors, and at most 256 ids appear.
        let DataSource::Synthetic(s) = &a else {
            panic!("synthetic")
        };
        let index_of = |id: u32| s.ids.iter().position(|&t| t == id).unwrap();
        let big = a.sample(key(0, 0), 8, 255).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for b in 0..big.batch {
            for w in big.row(b).windows(2) {
                let (from, to) = (index_of(w[0]), index_of(w[1]) as u32);
                assert!(s.successors[from].contains(&to));
                seen.insert(w[0]);
            }
        }
        assert!(seen.len() <= 256 && seen.len() > 50, "{}", seen.len());
        assert!((s.entropy_nats() - 1.13).abs() < 0.01);
    }

    #[test]
    fn skewed_variant_concentrates_tokens() {
        let spec = DataSpec::Synthetic(SyntheticSpec {
            variant: SyntheticVariant::Skewed,
            ..Default::default()
        });
        let src = DataSource::open(&spec, 512).unwrap();
        let batch = src.sample(key(0, 0), 8, 127).unwrap();
        let mut counts = std::collections::HashMap::new();
        for &t in &batch.tokens {
            *counts.entry(t).or_insert(0usize) += 1;
        }
        let mut c: Vec<usize> = counts.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top4: usize = c.iter().take(4).sum();
        assert!(
            top4 * 10 > batch.tokens.len() * 6,
            "top-4 tokens hold {top4} of {}",
            batch.tokens.len()
        );
    }

    /// A byte-level BPE tokenizer.json (GPT-2 style, as DeepSeek's) with a 12-token vocabulary:
    /// "the cat\n" encodes to [8, 11, 6].
    const TINY_TOKENIZER: &str = r#"{
      "version": "1.0",
      "truncation": null,
      "padding": null,
      "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": null,
      "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "model": {
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": false,
        "byte_fallback": false,
        "vocab": {"t": 0, "h": 1, "e": 2, "Ġ": 3, "c": 4, "a": 5, "Ċ": 6, "th": 7, "the": 8, "Ġc": 9,
                  "Ġca": 10, "Ġcat": 11},
        "merges": ["t h", "th e", "Ġ c", "Ġc a", "Ġca t"]
      }
    }"#;

    #[test]
    fn text_is_tokenized_with_a_tokenizer_json_and_sampled_in_windows() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, TINY_TOKENIZER).unwrap();
        let text = dir.path().join("cats.txt");
        std::fs::write(&text, "the cat\n".repeat(20)).unwrap();
        let spec = DataSpec::TextTokenized {
            path: text.clone(),
            tokenizer: tok.clone(),
        };
        let src = DataSource::open(&spec, 16).unwrap();
        let DataSource::Tokenized(t) = &src else {
            panic!("a tokenized source")
        };
        assert_eq!(t.n_tokens(), 60);
        assert!(
            t.tokens().chunks(3).all(|c| c == [8, 11, 6]),
            "{:?}",
            t.tokens()
        );
        let x = src.sample(key(2, 1), 3, 7).unwrap();
        assert_eq!(x, src.sample(key(2, 1), 3, 7).unwrap());
        // Every row is a window of the periodic sequence 8, 11, 6.
        let next = |a: u32| match a {
            8 => 11,
            11 => 6,
            _ => 8,
        };
        for b in 0..3 {
            assert!(
                x.row(b).windows(2).all(|w| w[1] == next(w[0])),
                "{:?}",
                x.row(b)
            );
        }
        // The spec round-trips through serde with its tag.
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"kind\":\"text_tokenized\""), "{json}");
        assert_eq!(serde_json::from_str::<DataSpec>(&json).unwrap(), spec);

        let err = DataSource::open(&spec, 10).unwrap_err().to_string();
        assert!(
            err.contains("cats.txt") && err.contains("token id 11 at position 1"),
            "{err}"
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = DataSource::open(
            &DataSpec::TextTokenized {
                path: text.clone(),
                tokenizer: bad,
            },
            16,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bad.json") && err.contains("tokenizer.json"),
            "{err}"
        );
        let latin1 = dir.path().join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9").unwrap();
        let err = DataSource::open(
            &DataSpec::TextTokenized {
                path: latin1,
                tokenizer: tok,
            },
            16,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("not UTF-8 (byte 3)"),
            "{err}"
        );
    }

    #[test]
    fn files_sample_windows_and_reject_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(&text, b"abcdefghijklmnopqrstuvwxyz").unwrap();
        let src = DataSource::open(&DataSpec::Text { path: text.clone() }, 256).unwrap();
        let x = src.sample(key(1, 0), 3, 5).unwrap();
        assert_eq!(x, src.sample(key(1, 0), 3, 5).unwrap());
        for b in 0..3 {
            // Every row is a contiguous window of the alphabet.
            assert!(
                x.row(b).windows(2).all(|w| w[1] == w[0] + 1),
                "{:?}",
                x.row(b)
            );
        }
        let err = src.sample(key(0, 0), 1, 26).unwrap_err().to_string();
        assert!(
            err.contains("t.txt") && err.contains("fewer than one sequence"),
            "{err}"
        );

        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, b"").unwrap();
        let err = DataSource::open(&DataSpec::Text { path: empty }, 256)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty.txt") && err.contains("is empty"),
            "{err}"
        );

        let err = DataSource::open(&DataSpec::Text { path: text }, 100)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.txt") && err.contains("token id 100 at position 3"),
            "{err}"
        );

        let ids = dir.path().join("ids.u16");
        let raw: Vec<u8> = [1u16, 2, 3, 600, 4]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        std::fs::write(&ids, &raw).unwrap();
        let spec = DataSpec::Tokens {
            path: ids.clone(),
            dtype: TokenDtype::U16,
        };
        let err = DataSource::open(&spec, 512).unwrap_err().to_string();
        assert!(
            err.contains("ids.u16") && err.contains("token id 600 at position 3"),
            "{err}"
        );
        let ok = DataSource::open(&spec, 1024).unwrap();
        assert_eq!(
            ok.sample(key(0, 0), 1, 4).unwrap().tokens,
            vec![1, 2, 3, 600, 4]
        );

        let ids32 = dir.path().join("ids.u32");
        std::fs::write(&ids32, [5u8, 0, 0, 0, 7, 0, 0, 0, 1]).unwrap();
        let err = DataSource::open(
            &DataSpec::Tokens {
                path: ids32.clone(),
                dtype: TokenDtype::U32,
            },
            64,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ids.u32") && err.contains("not a multiple"),
            "{err}"
        );
        let missing = DataSource::open(
            &DataSpec::Text {
                path: dir.path().join("nope"),
            },
            256,
        )
        .unwrap_err()
        .to_string();
        assert!(missing.contains("nope"), "{missing}");
    }
}
