//! The fuzz targets: one per decoder of bytes that come from another process, each with the
//! real blocks it needs and the seeds it starts from (valid encodings made by our encoders).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, DictionaryArray, Float64Array, Int32Array, ListArray, RecordBatch, StringArray,
};
use arrow::datatypes::{Int32Type, Int64Type};
use ndarray::{Array2, IxDyn};
use shm_arrow::{COLUMNS_CODEC, ColumnFrame, ColumnsCodec, read_ipc_block, write_ipc_block};
use shm_codec::{
    ARRAY_CODEC, Decoder, Encoder, FRAME_CODEC, Index, Payload, Registry, Serde, SerdeCodec,
    ShmArray, SimpleFrame, TUPLE_CODEC, Value,
};
use shm_core::{ShmPool, ShmRef};

/// What the targets decode against: a pool, and payloads whose blocks are real, so that fuzzed
/// metadata reaches the code that checks it against memory.
pub struct Harness {
    pool: ShmPool,
    decoder: Decoder,
    registry: Registry,
    array: Payload,
    frame: Payload,
    tuple: Payload,
    columns: Payload,
    /// Channel frames to start from, and the blocks they name (attachable while they live).
    channel: (Vec<Vec<u8>>, Vec<std::sync::Arc<shm_core::ShmBlock>>),
}

/// A named decoder of foreign bytes.
pub struct Target {
    /// Its name, as `--target` takes it.
    pub name: &'static str,
    /// Runs it on one input and says whether the input decoded to a value; any result is
    /// fine, a panic is a finding.
    pub run: fn(&Harness, &[u8]) -> bool,
    /// Valid inputs to start from.
    pub seeds: fn(&Harness) -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "payload",
        run: payload,
        seeds: payload_seeds,
    },
    Target {
        name: "array-meta",
        run: array_meta,
        seeds: |h| vec![h.array.meta.clone()],
    },
    Target {
        name: "frame-meta",
        run: frame_meta,
        seeds: |h| vec![h.frame.meta.clone()],
    },
    Target {
        name: "tuple-meta",
        run: tuple_meta,
        seeds: |h| vec![h.tuple.meta.clone()],
    },
    Target {
        name: "columns-meta",
        run: columns_meta,
        seeds: |h| vec![h.columns.meta.clone()],
    },
    Target {
        name: "shm-ref",
        run: shm_ref,
        seeds: |h| h.array.buffers().iter().map(ShmRef::to_bytes).collect(),
    },
    Target {
        name: "ipc",
        run: ipc,
        seeds: ipc_seeds,
    },
    Target {
        name: "channel-frame",
        run: channel_frame,
        seeds: |h| h.channel.0.clone(),
    },
    Target {
        name: "frame-wire",
        run: frame_wire,
        seeds: |h| h.channel.0.clone(),
    },
    Target {
        name: "link-message",
        run: link_message,
        seeds: link_message_seeds,
    },
    Target {
        name: "value",
        run: value,
        seeds: |_| vec![value_seed()],
    },
];

/// A self-describing value of every variant, nested, as the Python module sends dicts.
fn value_seed() -> Vec<u8> {
    let value = Value::Map(vec![
        (
            Value::Str("list".into()),
            Value::List(vec![
                Value::Unit,
                Value::Bool(true),
                Value::Int(-3),
                Value::Float(0.5),
                Value::Bytes(vec![0, 255]),
            ]),
        ),
        (Value::Int(7), Value::List(vec![Value::List(vec![])])),
    ]);
    postcard::to_stdvec(&value).expect("a value encodes")
}

/// `Value` from a peer's bytes: any nesting, any count, refused or read without a panic or a
/// stack overflow.
fn value(_: &Harness, bytes: &[u8]) -> bool {
    postcard::from_bytes::<Value>(bytes)
        .map(std::hint::black_box)
        .is_ok()
}

fn batch() -> RecordBatch {
    let strings = StringArray::from(vec![Some("a"), None, Some("ccc"), Some(""), None]);
    let dict: DictionaryArray<Int32Type> = vec!["x", "y", "x", "z", "y"].into_iter().collect();
    let list = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
        Some(vec![Some(1), None]),
        None,
        Some(vec![]),
        Some(vec![Some(4)]),
        Some(vec![Some(5), Some(6), Some(7)]),
    ]);
    RecordBatch::try_from_iter([
        (
            "i",
            Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5])) as ArrayRef,
        ),
        ("x", Arc::new(Float64Array::from(vec![0.5; 5])) as ArrayRef),
        ("s", Arc::new(strings) as ArrayRef),
        ("d", Arc::new(dict) as ArrayRef),
        ("l", Arc::new(list) as ArrayRef),
    ])
    .expect("a valid batch")
}

impl Harness {
    /// Blocks and payloads of every kind, in a pool of this process.
    pub fn new(pool: ShmPool) -> Self {
        let mut encoder = Encoder::new(pool.clone());
        // Small arrays go to blocks too, so that array metadata meets real memory.
        encoder.inline_threshold = 0;
        let data = Array2::from_shape_fn((64, 32), |(i, j)| (i * 32 + j) as f64);
        let array = encoder.encode(&data).expect("encode an array");
        let frame = SimpleFrame::from_columns(
            &pool,
            &[("a", &[1.0, 2.0][..]), ("a", &[3.0, 4.0][..])],
            Index::default(),
        )
        .and_then(|f| encoder.encode(&f))
        .expect("encode a frame");
        let tuple = encoder
            .encode(&(Serde(vec![7u8; 100]), &data, (Serde(3u64), &data.t())))
            .expect("encode a tuple");
        let columns = encoder
            .encode(&ColumnFrame(batch()))
            .expect("encode a batch");
        let mut registry = Registry::new();
        registry
            .register(ColumnsCodec)
            .register(SerdeCodec::<Vec<u8>>::new("serde"));
        Harness {
            decoder: Decoder::new(pool.clone()),
            channel: shm_transport::fuzzing::seeds(&pool),
            pool,
            registry,
            array,
            frame,
            tuple,
            columns,
        }
    }
}

/// A payload with fuzzed metadata over the real blocks of `base`.
fn with_meta(base: &Payload, codec: &str, meta: &[u8]) -> Payload {
    Payload::from_refs(
        codec,
        meta.to_vec(),
        base.buffers().to_vec(),
        base.inline.clone(),
    )
}

/// Reads every element of an array, as a user would.
fn touch<T: Copy + Default + std::ops::Add<Output = T>>(a: ndarray::ArrayViewD<'_, T>) -> T {
    a.iter().fold(T::default(), |acc, &x| acc + x)
}

fn payload(h: &Harness, data: &[u8]) -> bool {
    let Ok(payload) = Payload::from_bytes(data) else {
        return false;
    };
    let Ok(value) = h.registry.decode(&payload, &h.decoder) else {
        return false;
    };
    if let Some(a) = value.downcast_ref::<ShmArray<f64, IxDyn>>() {
        std::hint::black_box(touch(a.view()));
    }
    true
}

fn payload_seeds(h: &Harness) -> Vec<Vec<u8>> {
    [&h.array, &h.frame, &h.columns]
        .iter()
        .map(|p| p.to_bytes())
        .collect()
}

fn array_meta(h: &Harness, meta: &[u8]) -> bool {
    let payload = with_meta(&h.array, ARRAY_CODEC, meta);
    let mut decoded = false;
    if let Ok(a) = h.decoder.decode::<ShmArray<f64, IxDyn>>(&payload) {
        std::hint::black_box(touch(a.view()));
        std::hint::black_box(a.to_owned());
        decoded = true;
    }
    if let Ok(a) = h.decoder.decode::<ShmArray<i32, IxDyn>>(&payload) {
        std::hint::black_box(touch(a.view()));
        decoded = true;
    }
    if let Ok(a) = h.decoder.decode::<ShmArray<bool, IxDyn>>(&payload) {
        std::hint::black_box(a.view().iter().filter(|&&b| b).count());
        decoded = true;
    }
    decoded
}

fn frame_meta(h: &Harness, meta: &[u8]) -> bool {
    let payload = with_meta(&h.frame, FRAME_CODEC, meta);
    let Ok(f) = h.decoder.decode::<SimpleFrame<f64>>(&payload) else {
        return false;
    };
    for j in 0..f.ncols() {
        if let Some(c) = f.column_at(j) {
            std::hint::black_box(c.sum());
        }
    }
    true
}

fn tuple_meta(h: &Harness, meta: &[u8]) -> bool {
    let payload = with_meta(&h.tuple, TUPLE_CODEC, meta);
    type Members = (
        Serde<Vec<u8>>,
        ShmArray<f64, IxDyn>,
        (Serde<u64>, ShmArray<f64, IxDyn>),
    );
    let Ok((_, a, (_, b))) = h.decoder.decode::<Members>(&payload) else {
        return false;
    };
    std::hint::black_box(touch(a.view()) + touch(b.view()));
    true
}

fn columns_meta(h: &Harness, meta: &[u8]) -> bool {
    let payload = with_meta(&h.columns, COLUMNS_CODEC, meta);
    let Ok(ColumnFrame(batch)) = h.decoder.decode::<ColumnFrame>(&payload) else {
        return false;
    };
    // What decoded passed the decoder's validation (Arrow's, with shm-arrow's own passes for
    // strings and dictionary keys): Arrow's full validation must agree, and reads every value.
    for column in batch.columns() {
        if let Err(e) = column.to_data().validate_full() {
            panic!(
                "decoded a {} column that Arrow refuses: {e}",
                column.data_type()
            );
        }
    }
    true
}

fn shm_ref(h: &Harness, data: &[u8]) -> bool {
    let Ok(r) = ShmRef::from_bytes(data) else {
        return false;
    };
    // Only the harness's own segments are attached: the target must not read other processes'
    // memory on this host.
    if !h.array.buffers().iter().any(|own| own.name == r.name) {
        return shm_core::validate_name(&r.name).is_ok();
    }
    let Ok(block) = h.pool.attach(&r) else {
        return false;
    };
    std::hint::black_box(block.as_slice().iter().map(|&b| b as u64).sum::<u64>());
    true
}

fn ipc(h: &Harness, data: &[u8]) -> bool {
    let Ok(mut block) = h.pool.alloc(data.len()) else {
        return false;
    };
    block.as_mut_slice().copy_from_slice(data);
    let block = block.freeze();
    let Ok(batches) = read_ipc_block(&block) else {
        return false;
    };
    batches.iter().all(|batch| {
        batch
            .columns()
            .iter()
            .all(|column| column.to_data().validate_full().is_ok())
    })
}

fn ipc_seeds(h: &Harness) -> Vec<Vec<u8>> {
    let batch = batch();
    write_ipc_block(&h.pool, &batch.schema(), std::slice::from_ref(&batch))
        .map(|block| vec![block.as_slice().to_vec()])
        .unwrap_or_default()
}

fn channel_frame(h: &Harness, data: &[u8]) -> bool {
    shm_transport::fuzzing::receive(&h.pool, data).is_ok()
}

/// The hand-written frame reader and writer against serde's (a panic where they disagree).
fn frame_wire(_: &Harness, data: &[u8]) -> bool {
    shm_transport::fuzzing::frame_wire_agrees(data)
}

/// A message on a segment link: the first byte picks the descriptor that travels with the rest
/// (none, a sealed segment of the harness, a pipe, this program's own executable), the rest is
/// the message itself.
fn link_message(h: &Harness, data: &[u8]) -> bool {
    use std::os::fd::AsFd;
    let Some((&kind, message)) = data.split_first() else {
        return false;
    };
    let sealed = h.array.blocks().first().cloned();
    let pipe = std::io::pipe().ok();
    let file = std::env::current_exe()
        .ok()
        .and_then(|path| std::fs::File::open(path).ok());
    let fd = match kind % 4 {
        0 => None,
        1 => sealed.as_deref().and_then(shm_core::fuzzing::descriptor),
        2 => pipe.as_ref().map(|(reader, _)| reader.as_fd()),
        _ => file.as_ref().map(|f| f.as_fd()),
    };
    shm_core::fuzzing::receive(message, fd).is_ok()
}

fn link_message_seeds(h: &Harness) -> Vec<Vec<u8>> {
    let name = h.array.buffers()[0].name.as_bytes();
    vec![
        [&[1u8, b'+'][..], name].concat(),
        [&[0u8, b'-'][..], name].concat(),
    ]
}
