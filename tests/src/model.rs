//! The model-based test's shared half: the values both processes build, the digests both
//! compute, and the worker's handlers.
//!
//! Every call carries one [`Bundle`]: a command and five values of different codecs (an f64
//! array, an i32 array, a serde byte vector, a simple frame and an Arrow frame). The parent
//! sends the digests it computed; the worker recomputes them from what it reads and refuses
//! the call on any difference. The worker answers with a [`Reply`] whose digests the parent
//! checks the same way, and both sides keep some values and check them again later, so a block
//! recycled, overwritten or unmapped under a holder is caught on whichever side holds it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int64Type};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use shm_arrow::ColumnFrame;
use shm_codec::{Index, Serde, ShmArray, ShmArrayMut, SimpleFrame};
use shm_core::ShmPool;
use shm_transport::{Context, Router};

/// What the worker does with a call.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Command {
    /// The digests of the five values, as the parent computed them.
    pub expect: Digests,
    /// How long the handler sleeps before it answers (calls with timeouts race this).
    pub sleep_ms: u64,
    /// Keep the arguments under this key until `model_drop` (views held past the call).
    pub hold: Option<u64>,
    /// How the worker builds its answer.
    pub answer: Answer,
    /// Seed of the values the worker makes.
    pub seed: u64,
}

/// How the worker builds its answer.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Answer {
    /// Fresh values, made in the worker's pool.
    #[default]
    Fresh,
    /// The arguments themselves, sent back: a reversed slice of the f64 array and the Arrow
    /// frame as received (the parent's own blocks, one hop further).
    Resend,
}

/// Digests of the five values of a bundle, in order.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Digests(pub [u64; 5]);

/// What the worker answers: its digests of what it returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The digests of the four values that follow in the reply.
    pub digests: [u64; 4],
}

/// The arguments of a model call; the third member is itself a tuple (tuples nest).
pub type Bundle = (
    Serde<Command>,
    ShmArray<f64, IxDyn>,
    (Serde<u64>, ShmArray<i32, IxDyn>),
    Serde<Vec<u8>>,
    SimpleFrame<f64>,
    ColumnFrame,
);

/// The result of a model call.
pub type Reply = (
    Serde<Report>,
    ShmArray<f64, IxDyn>,
    Serde<Vec<u8>>,
    SimpleFrame<f64>,
    ColumnFrame,
);

/// A 64-bit mix of a running digest and one more word (splitmix64's finaliser).
fn mix(acc: u64, word: u64) -> u64 {
    let mut z = acc
        ^ word
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(acc << 6);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Digest of an f64 array: its shape and every value in logical order.
pub fn digest_f64<'a>(shape: &[usize], values: impl Iterator<Item = &'a f64>) -> u64 {
    let acc = shape.iter().fold(1, |acc, &n| mix(acc, n as u64));
    values.fold(acc, |acc, v| mix(acc, v.to_bits()))
}

/// Digest of an i32 array: its shape and every value in logical order.
pub fn digest_i32<'a>(shape: &[usize], values: impl Iterator<Item = &'a i32>) -> u64 {
    let acc = shape.iter().fold(2, |acc, &n| mix(acc, n as u64));
    values.fold(acc, |acc, &v| mix(acc, v as u32 as u64))
}

/// Digest of the nested member: a tag and an i32 array.
pub fn digest_tagged<'a>(tag: u64, shape: &[usize], values: impl Iterator<Item = &'a i32>) -> u64 {
    mix(digest_i32(shape, values), tag)
}

/// Digest of a byte vector.
pub fn digest_bytes(bytes: &[u8]) -> u64 {
    let acc = mix(3, bytes.len() as u64);
    bytes.chunks(8).fold(acc, |acc, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        mix(acc, u64::from_le_bytes(w))
    })
}

/// Digest of a simple frame: labels and values, column by column.
pub fn digest_frame(frame: &SimpleFrame<f64>) -> u64 {
    let mut acc = mix(4, frame.nrows() as u64);
    for (j, name) in frame.columns().iter().enumerate() {
        acc = mix(acc, digest_bytes(name.as_bytes()));
        if let Some(column) = frame.column_at(j) {
            acc = column.iter().fold(acc, |acc, v| mix(acc, v.to_bits()));
        }
    }
    acc
}

/// Digest of a batch of the model's schema (`i` Int64, `s` nullable Utf8, `x` Float64).
pub fn digest_batch(batch: &RecordBatch) -> u64 {
    let mut acc = mix(5, batch.num_rows() as u64);
    for column in batch.columns() {
        // Memory that changed under the reader may no longer be a valid array: say so in the
        // digest rather than read out of bounds.
        if column.to_data().validate_full().is_err() {
            return 0xbad;
        }
        acc = mix(acc, column.null_count() as u64);
        if let Some(a) = column.as_primitive_opt::<Int64Type>() {
            acc = a
                .iter()
                .fold(acc, |acc, v| mix(acc, v.map_or(7, |v| v as u64)));
        } else if let Some(a) = column.as_primitive_opt::<Float64Type>() {
            acc = a
                .iter()
                .fold(acc, |acc, v| mix(acc, v.map_or(7, f64::to_bits)));
        } else if let Some(a) = column.as_string_opt::<i32>() {
            acc = a.iter().fold(acc, |acc, v| {
                mix(acc, v.map_or(7, |s| digest_bytes(s.as_bytes())))
            });
        } else {
            acc = mix(acc, 0xdead);
        }
    }
    acc
}

/// A small deterministic generator (xorshift64*), so that a failing seed replays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed, 0x5eed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A length from a spread of sizes: empty, tiny, under and over the inline threshold, and
/// (rarely) a few hundred kilobytes.
pub fn length(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0 => 0,
        1..=4 => rng.below(64) as usize + 1,
        5..=7 => rng.below(4096) as usize + 1,
        8 => 8192 + rng.below(20_000) as usize,
        _ => 50_000 + rng.below(60_000) as usize,
    }
}

/// An f64 array of about `n` elements, one or two dimensions, values from `seed`.
pub fn f64_array(n: usize, seed: u64) -> ArrayD<f64> {
    let s = seed as f64;
    if n >= 8 && seed.is_multiple_of(2) {
        let cols = 1 + (seed as usize % 7);
        let rows = n / cols;
        ArrayD::from_shape_fn(IxDyn(&[rows, cols]), |ix| {
            s + (ix[0] * cols + ix[1]) as f64 * 0.5
        })
    } else {
        ArrayD::from_shape_fn(IxDyn(&[n]), |ix| s - ix[0] as f64 * 0.25)
    }
}

/// An i32 array of about `n` elements.
pub fn i32_array(n: usize, seed: u64) -> ArrayD<i32> {
    ArrayD::from_shape_fn(IxDyn(&[n]), |ix| {
        (seed as i32).wrapping_mul(31) ^ ix[0] as i32
    })
}

/// Serde bytes: small, or (when `large`) past the 1 MiB inline limit of the serde codec.
pub fn bytes(n: usize, seed: u64, large: bool) -> Vec<u8> {
    let len = if large { (1 << 20) + 4096 + n } else { n };
    (0..len)
        .map(|i| (i as u64 ^ seed).wrapping_mul(131) as u8)
        .collect()
}

/// A simple frame of `rows` rows and two columns with the same name, in `pool`.
pub fn frame(pool: &ShmPool, rows: usize, seed: u64) -> SimpleFrame<f64> {
    let a: Vec<f64> = (0..rows).map(|i| (i as u64 + seed) as f64).collect();
    let b: Vec<f64> = (0..rows).map(|i| -((i as u64 * seed) as f64)).collect();
    SimpleFrame::from_columns(pool, &[("a", &a[..]), ("a", &b[..])], Index::default())
        .expect("a simple frame fits the pool")
}

/// A batch of the model's schema with `rows` rows; every third string is null.
pub fn batch(rows: usize, seed: u64) -> RecordBatch {
    let i = Int64Array::from_iter_values((0..rows as i64).map(|v| v ^ seed as i64));
    let s = StringArray::from_iter((0..rows).map(|r| (r % 3 != 0).then(|| format!("{seed}-{r}"))));
    let x = Float64Array::from_iter_values((0..rows).map(|r| r as f64 / (seed as f64 + 1.0)));
    RecordBatch::try_from_iter([
        ("i", Arc::new(i) as _),
        ("s", Arc::new(s) as _),
        ("x", Arc::new(x) as _),
    ])
    .expect("the model's schema")
}

/// Arguments the worker holds, with the digests they had when they arrived.
type Held = HashMap<u64, (Bundle, Digests)>;

fn held() -> &'static Mutex<Held> {
    static HELD: LazyLock<Mutex<Held>> = LazyLock::new(Mutex::default);
    &HELD
}

/// The digests of what a bundle holds now.
pub fn digests_of(bundle: &Bundle) -> Digests {
    let (_, a, (Serde(tag), b), Serde(c), d, ColumnFrame(e)) = bundle;
    let a = a.view();
    let b = b.view();
    Digests([
        digest_f64(a.shape(), a.iter()),
        digest_tagged(*tag, b.shape(), b.iter()),
        digest_bytes(c),
        digest_frame(d),
        digest_batch(e),
    ])
}

fn model_call(bundle: Bundle, ctx: &Context<'_>) -> Result<Reply, String> {
    let command = bundle.0.0.clone();
    let seen = digests_of(&bundle);
    if seen != command.expect {
        return Err(format!(
            "the worker read other values than the parent sent: expected {:?}, read {:?}",
            command.expect, seen
        ));
    }
    if command.sleep_ms > 0 {
        std::thread::sleep(Duration::from_millis(command.sleep_ms));
    }
    let reply: Reply = match command.answer {
        Answer::Fresh => {
            let seed = command.seed;
            let n = (seed % 5000) as usize;
            let source = f64_array(n, seed);
            let mut array = ShmArrayMut::<f64, IxDyn>::zeros(ctx.pool(), source.shape())
                .map_err(|e| e.to_string())?;
            array.view_mut().assign(&source);
            let large = seed.is_multiple_of(13);
            (
                Serde(Report { digests: [0; 4] }),
                array.freeze(),
                Serde(bytes(n, seed, large)),
                frame(ctx.pool(), n % 300, seed),
                ColumnFrame(batch(n % 500, seed)),
            )
        }
        Answer::Resend => {
            let a = &bundle.1;
            let slice = if a.ndim_is_one() {
                a.slice(ndarray::s![..;-1]).into_dyn()
            } else {
                a.clone()
            };
            (
                Serde(Report { digests: [0; 4] }),
                slice,
                bundle.3.clone(),
                bundle.4.clone(),
                bundle.5.clone(),
            )
        }
    };
    let (_, a, Serde(c), d, ColumnFrame(e)) = &reply;
    let av = a.view();
    let digests = [
        digest_f64(av.shape(), av.iter()),
        digest_bytes(c),
        digest_frame(d),
        digest_batch(e),
    ];
    if let Some(key) = command.hold {
        held()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (bundle, seen));
    }
    Ok((
        Serde(Report { digests }),
        reply.1,
        reply.2,
        reply.3,
        reply.4,
    ))
}

/// Helpers on dynamic arrays the handlers need.
trait DynShape {
    fn ndim_is_one(&self) -> bool;
}

impl DynShape for ShmArray<f64, IxDyn> {
    fn ndim_is_one(&self) -> bool {
        self.shape().len() == 1
    }
}

/// The worker's model handlers: `model` (check, maybe hold, answer), `model_verify` (check
/// every held bundle again; returns the mismatches), `model_drop` (let go of held keys).
pub fn handlers(router: Router) -> Router {
    router
        .handle("model", |bundle: Bundle, ctx| model_call(bundle, ctx))
        .handle("model_verify", |(): (), _| {
            let held = held().lock().unwrap_or_else(PoisonError::into_inner);
            let bad: Vec<String> = held
                .iter()
                .filter(|(_, (bundle, digests))| digests_of(bundle) != *digests)
                .map(|(key, _)| format!("held arguments {key} changed under the worker"))
                .collect();
            Ok::<_, String>(Serde(bad))
        })
        .handle("model_live_blocks", |(): (), ctx| {
            Ok::<_, String>(Serde(ctx.pool().stats().live_blocks as u64))
        })
        .handle("model_drop", |Serde(keys): Serde<Vec<u64>>, _| {
            let mut held = held().lock().unwrap_or_else(PoisonError::into_inner);
            for key in keys {
                held.remove(&key);
            }
            Ok::<_, String>(Serde(held.len() as u64))
        })
}
