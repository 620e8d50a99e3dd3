//! Interoperability with the reference implementations: pyarrow and numpy read what shm wrote
//! into shared memory, and shm reads what they wrote. `cargo xtask test` provides the Python
//! environment (target/pyenv, from tests/python/requirements.txt) and sets `SHM_PYTHON`.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{
    DataType, Decimal128Type, Decimal256Type, Float64Type, Int8Type, Int32Type, Int64Type,
    UInt8Type, i256,
};
use ndarray::{Array2, Ix1, Ix2, IxDyn};
use shm_arrow::{read_ipc_block, write_ipc_block};
use shm_codec::{CodecError, Complex, Decoder, Encoder, ForeignArray, Payload, ShmArray};
use shm_core::{ShmBlock, ShmPool};
use shm_tests::{ChildProcess, CleanShm, python};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/interop.py");

/// Runs a read command of the script, with `block`'s descriptor on its link; its output.
fn run(python: &str, args: &[&str], block: &ShmBlock) -> String {
    let mut command = vec![SCRIPT];
    command.extend(args);
    let (mut child, _link) = ChildProcess::spawn_linked(python, &command, &[block]);
    let mut out = String::new();
    while let Some(line) = child.read_line_or_end() {
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.child.wait().unwrap();
    assert!(status.success(), "python {args:?} failed: {status}");
    out
}

fn python_segments() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("psm_"))
        .collect()
}

#[test]
fn pyarrow_reads_an_ipc_block_written_by_rust() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let kind: DictionaryArray<Int32Type> = vec!["u", "v", "u"].into_iter().collect();
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])) as Arc<dyn Array>,
        ),
        (
            "name",
            Arc::new(StringArray::from(vec![Some("a"), None, Some("None")])) as _,
        ),
        (
            "score",
            Arc::new(Float64Array::from(vec![0.5, 1.5, 2.5])) as _,
        ),
        ("kind", Arc::new(kind) as _),
    ])
    .unwrap();
    let block = write_ipc_block(&pool, &batch.schema(), &[batch]).unwrap();
    let r = block.to_ref();
    let out = run(
        &python,
        &[
            "read-ipc",
            &r.name,
            &r.offset.to_string(),
            &r.content_size.to_string(),
        ],
        &block,
    );
    assert_eq!(
        out,
        "3\n['id', 'name', 'score', 'kind']\n\
         {'id': [1, None, 3], 'name': ['a', None, 'None'], 'score': [0.5, 1.5, 2.5], 'kind': ['u', 'v', 'u']}\n"
    );
    drop((block, pool));
    clean.end();
}

#[test]
fn rust_reads_a_pyarrow_stream_whose_decimals_are_only_8_byte_aligned() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let before = python_segments();
    let pool = ShmPool::new().unwrap();
    let mut writer = ChildProcess::spawn(&python, &[SCRIPT, "write-ipc-decimals"]);
    let line = writer.read_line();
    let (name, size) = line.split_once(' ').unwrap();
    let size: u64 = size.parse().unwrap();
    // SAFETY: the Python writer neither writes nor shrinks its segment until stdin closes,
    // after the block is dropped.
    let mut block = unsafe { pool.attach_segment(name) }.unwrap();
    block.set_len(size as usize).unwrap();
    let block = Arc::new(block);
    let batches = read_ipc_block(&block).unwrap();
    let b = &batches[0];
    let d128 = b
        .column_by_name("d128")
        .unwrap()
        .as_primitive::<Decimal128Type>();
    assert_eq!(
        (d128.value(0), d128.value(1), d128.is_null(2)),
        (123, -456, true)
    );
    assert_eq!(d128.data_type(), &DataType::Decimal128(10, 2));
    let d256 = b
        .column_by_name("d256")
        .unwrap()
        .as_primitive::<Decimal256Type>();
    assert_eq!(
        (d256.value(0), d256.is_null(1), d256.value(2)),
        (i256::from(12_345_678), true, i256::from(-1))
    );
    let flag = b.column_by_name("flag").unwrap().as_primitive::<Int8Type>();
    assert_eq!(flag.values().as_ref(), &[1, 2, 3]);
    let tiny = b
        .column_by_name("tiny")
        .unwrap()
        .as_primitive::<UInt8Type>();
    assert_eq!(tiny.values().as_ref(), &[7, 8, 9]);
    // Only the misaligned buffer was copied; the others are read where pyarrow wrote them.
    let start = block.as_ptr() as usize;
    let in_block = |p: *const u8| (start..start + block.len()).contains(&(p as usize));
    assert!(in_block(flag.values().as_ptr().cast()) && in_block(tiny.values().as_ptr()));
    assert!(
        !in_block(d128.values().as_ptr().cast()),
        "the decimal128 buffer was copied"
    );
    drop((batches, block));
    writer.finish();
    assert_eq!(python_segments(), before, "Python unlinked its segment");
    drop(pool);
    clean.end();
}

#[test]
fn rust_reads_an_ipc_stream_that_pyarrow_wrote() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let before = python_segments();
    let pool = ShmPool::new().unwrap();
    let mut writer = ChildProcess::spawn(&python, &[SCRIPT, "write-ipc"]);
    let line = writer.read_line();
    let (name, size) = line.split_once(' ').unwrap();
    let size: u64 = size.parse().unwrap();
    // SAFETY: the Python writer neither writes nor shrinks its segment until stdin closes,
    // after the block is dropped.
    let mut block = unsafe { pool.attach_segment(name) }.unwrap();
    block.set_len(size as usize).unwrap();
    let block = Arc::new(block);
    let batches = read_ipc_block(&block).unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.num_rows(), 4);
    let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
    assert_eq!((id.value(0), id.is_null(2), id.value(3)), (1, true, 4));
    let names = b.column_by_name("name").unwrap().as_string::<i32>();
    assert_eq!((names.value(0), names.is_null(1)), ("alpha", true));
    let score = b
        .column_by_name("score")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!((score.value(2), score.is_null(3)), (2.5, true));
    let kind = b
        .column_by_name("kind")
        .unwrap()
        .as_dictionary::<Int32Type>();
    let values = kind.values().as_string::<i32>();
    assert_eq!(values.value(kind.keys().value(1) as usize), "v");
    let ok = b.column_by_name("ok").unwrap().as_boolean();
    assert_eq!(
        (ok.value(0), ok.value(1), ok.is_null(2)),
        (true, false, true)
    );
    drop((batches, block));
    writer.finish();
    assert_eq!(python_segments(), before, "Python unlinked its segment");
    drop(pool);
    clean.end();
}

/// The array metadata of shm-codec, as another implementation reads it (docs/format.md).
#[derive(serde::Deserialize)]
struct ArrayMeta {
    typestr: String,
    shape: Vec<u64>,
    strides: Vec<i64>,
    origin: u64,
}

fn joined(values: impl IntoIterator<Item = impl ToString>) -> String {
    values
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn numpy_maps_arrays_that_rust_wrote_in_every_layout() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let mut encoder = Encoder::new(ShmPool::new().unwrap());
    encoder.inline_threshold = 0; // small arrays too go to shared memory here
    let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 10 + j) as i32);
    let decoder = Decoder::new(ShmPool::new().unwrap());
    let received: ShmArray<i32, Ix2> = decoder.decode(&encoder.encode(&a.t()).unwrap()).unwrap();
    let negative = received.slice(ndarray::s![..;-2, 1..]);
    let cases: Vec<(Payload, String)> = vec![
        (
            encoder.encode(&a).unwrap(),
            "(3, 4) <i4\n[[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]\n".into(),
        ),
        (
            encoder.encode(&a.t()).unwrap(),
            "(4, 3) <i4\n[[0, 10, 20], [1, 11, 21], [2, 12, 22], [3, 13, 23]]\n".into(),
        ),
        (
            encoder.encode(&negative).unwrap(),
            "(2, 2) <i4\n[[13, 23], [11, 21]]\n".into(),
        ),
    ];
    for (payload, expected) in cases {
        let meta: ArrayMeta = postcard::from_bytes(&payload.meta).unwrap();
        let r = &payload.buffers()[0];
        let out = run(
            &python,
            &[
                "read-array",
                &r.name,
                &r.offset.to_string(),
                &r.content_size.to_string(),
                &meta.typestr,
                &joined(meta.shape),
                &joined(meta.strides),
                &meta.origin.to_string(),
            ],
            &payload.blocks()[0],
        );
        assert_eq!(out, expected);
    }
    drop((received, negative, encoder, decoder));
    clean.end();
}

/// Views an array that the Python writer of the test made.
fn foreign<T: shm_codec::Element, D: ndarray::Dimension>(
    pool: &ShmPool,
    array: &ForeignArray,
) -> shm_codec::Result<ShmArray<T, D>> {
    // SAFETY: the Python writer neither writes nor shrinks its segment until its stdin
    // closes, which the test does only after dropping every array.
    unsafe { ShmArray::from_foreign(pool, array) }
}

#[test]
fn rust_views_arrays_that_numpy_wrote_given_name_offset_typestr_shape_strides() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let before = python_segments();
    let pool = ShmPool::new().unwrap();
    let mut writer = ChildProcess::spawn(&python, &[SCRIPT, "write-arrays"]);
    let mut arrays = Vec::new();
    loop {
        let line = writer.read_line();
        if line == "end" {
            break;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let [name, offset, typestr, shape, strides] = fields[..] else {
            panic!("{line}")
        };
        let numbers = |s: &str| -> Vec<i64> { s.split(',').map(|x| x.parse().unwrap()).collect() };
        arrays.push(ForeignArray {
            // As Python prints it, without the leading slash.
            name: name.to_owned(),
            offset: offset.parse().unwrap(),
            typestr: typestr.to_owned(),
            shape: numbers(shape).into_iter().map(|n| n as u64).collect(),
            strides: (strides != "C").then(|| numbers(strides)),
        });
    }
    let [fortran, odd, reversed, complex] = &arrays[..] else {
        panic!("{arrays:?}")
    };
    let a = foreign::<f64, Ix2>(&pool, fortran).unwrap();
    let expected = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f64 * 1.5);
    assert_eq!(a.view(), expected.view());
    assert_eq!(a.order(), shm_codec::Order::F);
    let b = foreign::<i32, Ix2>(&pool, odd).unwrap();
    assert_eq!(odd.offset, 100);
    assert_eq!(b.view(), ndarray::arr2(&[[1, -2, 3], [-4, 5, -6]]));
    let c = foreign::<u16, IxDyn>(&pool, reversed).unwrap();
    assert_eq!(reversed.strides, Some(vec![-4]));
    assert_eq!(c.view().iter().copied().collect::<Vec<_>>(), [50, 30, 10]);
    let d = foreign::<Complex<f64>, Ix1>(&pool, complex).unwrap();
    assert_eq!(
        d.view().to_vec(),
        [
            Complex::new(1.0, 2.0),
            Complex::new(0.0, -3.0),
            Complex::new(4.0, 0.0)
        ]
    );
    // What does not match is refused with the numbers, not read.
    let wrong_type = foreign::<f32, Ix2>(&pool, fortran);
    assert!(
        matches!(wrong_type, Err(CodecError::WrongDtype { .. })),
        "{wrong_type:?}"
    );
    let past_the_end = ForeignArray {
        offset: 4096 - 8,
        ..fortran.clone()
    };
    assert!(foreign::<f64, Ix2>(&pool, &past_the_end).is_err());
    drop((a, b, c, d));
    writer.finish();
    assert_eq!(python_segments(), before, "Python unlinked its segment");
    drop(pool);
    clean.end();
}
