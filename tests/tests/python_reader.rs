//! The proof of docs/format.md: `tests/python/reader.py`, written from that page alone (numpy
//! and pyarrow, no project code), decodes every kind of payload this side writes and checks
//! every value — arrays of every dtype and order, slices with negative strides, simple frames,
//! tuples, serde values, Arrow frames whole, sliced and re-sent.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::*;
use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::*;
use ndarray::{Array0, Array2, Ix2, s};
use shm_arrow::{ColumnFrame, write_ipc_block};
use shm_codec::{Complex, Decoder, Element, Encoder, Index, Payload, Serde, ShmArray, SimpleFrame};
use shm_core::{ShmBlock, ShmPool};
use shm_tests::{ChildProcess, CleanShm, python, to_hex};

const READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/reader.py");

/// An element as the manifest's JSON writes it.
trait Json: Element {
    fn json(&self) -> String;
    fn from_index(i: usize) -> Self;
}

macro_rules! json_number {
    ($($t:ty),*) => {$(
        impl Json for $t {
            fn json(&self) -> String {
                format!("{self}")
            }
            fn from_index(i: usize) -> Self {
                (i % 100) as $t
            }
        }
    )*};
}
json_number!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! json_float {
    ($($t:ty),*) => {$(
        impl Json for $t {
            fn json(&self) -> String {
                format!("{self:?}")
            }
            fn from_index(i: usize) -> Self {
                i as $t * 0.5 - 3.0
            }
        }
    )*};
}
json_float!(f32, f64);

impl Json for bool {
    fn json(&self) -> String {
        format!("{self}")
    }
    fn from_index(i: usize) -> Self {
        i.is_multiple_of(3)
    }
}

macro_rules! json_complex {
    ($($t:ty),*) => {$(
        impl Json for Complex<$t> {
            fn json(&self) -> String {
                format!("[{}, {}]", self.re.json(), self.im.json())
            }
            fn from_index(i: usize) -> Self {
                Complex::new(<$t>::from_index(i), <$t>::from_index(i + 7))
            }
        }
    )*};
}
json_complex!(f32, f64);

/// `{"typestr", "shape", "values"}` of an array's logical content.
fn array_expect<T: Json, D: ndarray::Dimension>(a: ndarray::ArrayView<'_, T, D>) -> String {
    let shape: Vec<String> = a.shape().iter().map(|n| n.to_string()).collect();
    let values: Vec<String> = a.iter().map(Json::json).collect();
    format!(
        r#""typestr": "{}", "shape": [{}], "values": [{}]"#,
        T::DTYPE.typestr(),
        shape.join(", "),
        values.join(", ")
    )
}

/// Everything the cases need to stay alive while Python reads them.
struct Cases {
    encoder: Encoder,
    block_encoder: Encoder,
    decoder: Decoder,
    manifest: String,
    payloads: Vec<Payload>,
    blocks: Vec<Arc<ShmBlock>>,
    keep: Vec<Box<dyn std::any::Any>>,
}

impl Cases {
    fn add(&mut self, kind: &str, label: &str, payload: Payload, expect: String) {
        writeln!(
            self.manifest,
            r#"{{"kind": "{kind}", "label": "{label}", "payload": "{}", "expect": {expect}}}"#,
            to_hex(&payload.to_bytes())
        )
        .unwrap();
        self.payloads.push(payload);
    }

    fn arrays_of<T: Json>(&mut self) {
        let name = T::DTYPE.typestr();
        let a = Array2::from_shape_fn((4, 5), |(i, j)| T::from_index(i * 5 + j));
        // Inline, C order.
        let payload = self.encoder.encode(&a).unwrap();
        self.add(
            "array",
            &format!("{name} C inline"),
            payload,
            format!("{{{}}}", array_expect(a.view())),
        );
        // In a block, F order.
        let f = a.t();
        let payload = self.block_encoder.encode(&f).unwrap();
        let expect = format!("{{{}}}", array_expect(f.view()));
        let received: ShmArray<T, Ix2> = self.decoder.decode(&payload).unwrap();
        self.add("array", &format!("{name} F block"), payload, expect);
        // A slice of a received array, sent on as the same block: negative strides, an origin.
        let slice = received.slice(s![..;-2, 1..;2]);
        let payload = self.block_encoder.encode(&slice).unwrap();
        assert_eq!(payload.buffers()[0].name, received.block().unwrap().name());
        let expect = format!("{{{}}}", array_expect(slice.view()));
        self.add("array", &format!("{name} reversed slice"), payload, expect);
        self.keep.push(Box::new((received, slice)));
    }
}

fn strings(n: usize) -> StringArray {
    (0..n)
        .map(|i| (i % 4 != 1).then(|| format!("s{i}-{}", "x".repeat(i % 17))))
        .collect()
}

fn every_nulls(n: usize) -> Option<NullBuffer> {
    Some(NullBuffer::from_iter((0..n).map(|i| i % 5 != 3)))
}

fn union_fields() -> UnionFields {
    UnionFields::try_new(
        [3, 7],
        [
            Field::new("i", DataType::Int32, true),
            Field::new("s", DataType::Utf8, true),
        ],
    )
    .unwrap()
}

/// A batch with a column of most Arrow types, nulls included.
fn batch(n: usize) -> RecordBatch {
    let ints: Int64Array = (0..n as i64)
        .map(|i| (i % 5 != 2).then_some(i * 7 - 20))
        .collect();
    let via = |t: DataType| cast(&ints, &t).unwrap();
    let item = |t: DataType| Arc::new(Field::new("item", t, true));
    let list_values = Int32Array::from_iter((0..2 * n as i32).map(Some));
    let struct_fields = Fields::from(vec![
        Field::new("a", DataType::Int32, true),
        Field::new("b", DataType::Utf8, true),
    ]);
    let entries = Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Int64, true),
    ]);
    let keys: StringArray = (0..2 * n).map(|i| Some(format!("k{i}"))).collect();
    let map = MapArray::new(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(entries.clone()),
            false,
        )),
        OffsetBuffer::new((0..=n as i32).map(|i| 2 * i).collect()),
        StructArray::new(
            entries,
            vec![
                Arc::new(keys),
                Arc::new(Int64Array::from_iter_values(0..2 * n as i64)),
            ],
            None,
        ),
        every_nulls(n),
        false,
    );
    let type_ids: ScalarBuffer<i8> = (0..n).map(|i| if i % 2 == 0 { 3 } else { 7 }).collect();
    let sparse = UnionArray::try_new(
        union_fields(),
        type_ids.clone(),
        None,
        vec![
            Arc::new(Int32Array::from_iter((0..n as i32).map(Some))),
            Arc::new(strings(n)),
        ],
    )
    .unwrap();
    let dense = UnionArray::try_new(
        union_fields(),
        type_ids,
        Some((0..n as i32).map(|i| i / 2).collect()),
        vec![
            Arc::new(Int32Array::from_iter((0..n.div_ceil(2) as i32).map(Some))),
            Arc::new(strings(n / 2)),
        ],
    )
    .unwrap();
    let runs = n.div_ceil(3);
    let ree = RunArray::<Int32Type>::try_new(
        &Int32Array::from_iter_values((1..=runs as i32).map(|r| (3 * r).min(n as i32))),
        &strings(runs),
    )
    .unwrap();
    let dictionary: DictionaryArray<Int32Type> = (0..n)
        .map(|i| (i % 6 != 4).then(|| ["red", "green", "blue"][i % 3]))
        .collect();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("i64", Arc::new(ints.clone())),
        ("i8", via(DataType::Int8)),
        ("u32", via(DataType::UInt32)),
        ("f64", via(DataType::Float64)),
        ("f16", via(DataType::Float16)),
        (
            "bool",
            Arc::new(BooleanArray::from_iter(
                (0..n).map(|i| (i % 7 != 0).then_some(i % 2 == 0)),
            )),
        ),
        ("utf8", Arc::new(strings(n))),
        (
            "large_utf8",
            cast(&strings(n), &DataType::LargeUtf8).unwrap(),
        ),
        ("binary", cast(&strings(n), &DataType::Binary).unwrap()),
        ("utf8_view", cast(&strings(n), &DataType::Utf8View).unwrap()),
        (
            "fixed_binary",
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    (0..n).map(|i| (i % 4 != 0).then_some([i as u8; 5])),
                    5,
                )
                .unwrap(),
            ),
        ),
        ("decimal128", via(DataType::Decimal128(20, 3))),
        ("decimal256", via(DataType::Decimal256(50, -2))),
        (
            "timestamp",
            via(DataType::Timestamp(
                TimeUnit::Millisecond,
                Some("UTC".into()),
            )),
        ),
        (
            "date32",
            cast(&via(DataType::Int32), &DataType::Date32).unwrap(),
        ),
        (
            "time64",
            cast(
                &ints.unary::<_, Int64Type>(|v| v + 20),
                &DataType::Time64(TimeUnit::Nanosecond),
            )
            .unwrap(),
        ),
        ("duration", via(DataType::Duration(TimeUnit::Second))),
        (
            "list",
            Arc::new(ListArray::new(
                item(DataType::Int32),
                OffsetBuffer::new((0..=n as i32).map(|i| 2 * i).collect()),
                Arc::new(list_values.clone()),
                every_nulls(n),
            )),
        ),
        (
            "large_list",
            Arc::new(LargeListArray::new(
                item(DataType::Utf8),
                OffsetBuffer::new((0..=n as i64).collect()),
                Arc::new(strings(n)),
                every_nulls(n),
            )),
        ),
        (
            "fixed_list",
            Arc::new(FixedSizeListArray::new(
                item(DataType::Int32),
                2,
                Arc::new(list_values),
                every_nulls(n),
            )),
        ),
        (
            "list_view",
            Arc::new(ListViewArray::new(
                item(DataType::Utf8),
                (0..n as i32).rev().collect(),
                (0..n as i32)
                    .map(|i| i32::from(i < n as i32 - 1 && i % 2 == 0))
                    .collect(),
                Arc::new(strings(n)),
                every_nulls(n),
            )),
        ),
        (
            "struct",
            Arc::new(StructArray::new(
                struct_fields,
                vec![cast(&ints, &DataType::Int32).unwrap(), Arc::new(strings(n))],
                every_nulls(n),
            )),
        ),
        ("map", Arc::new(map)),
        ("dictionary", Arc::new(dictionary)),
        ("sparse_union", Arc::new(sparse)),
        ("dense_union", Arc::new(dense)),
        ("run_end", Arc::new(ree)),
        ("null", Arc::new(NullArray::new(n))),
    ];
    RecordBatch::try_from_iter(columns).unwrap()
}

#[test]
fn a_reader_written_from_the_format_page_decodes_every_payload_kind() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let mut block_encoder = Encoder::new(pool.clone());
    block_encoder.inline_threshold = 0;
    let mut cases = Cases {
        encoder: Encoder::new(pool.clone()),
        block_encoder,
        decoder: Decoder::new(ShmPool::new().unwrap()),
        manifest: String::new(),
        payloads: Vec::new(),
        blocks: Vec::new(),
        keep: Vec::new(),
    };

    cases.arrays_of::<bool>();
    cases.arrays_of::<i8>();
    cases.arrays_of::<i16>();
    cases.arrays_of::<i32>();
    cases.arrays_of::<i64>();
    cases.arrays_of::<u8>();
    cases.arrays_of::<u16>();
    cases.arrays_of::<u32>();
    cases.arrays_of::<u64>();
    cases.arrays_of::<f32>();
    cases.arrays_of::<f64>();
    cases.arrays_of::<Complex<f32>>();
    cases.arrays_of::<Complex<f64>>();
    let zero_d = Array0::from_elem((), 2.5f64);
    let payload = cases.encoder.encode(&zero_d).unwrap();
    cases.add(
        "array",
        "0-d",
        payload,
        format!("{{{}}}", array_expect(zero_d.view())),
    );
    let empty = Array2::<i32>::zeros((0, 3));
    let payload = cases.block_encoder.encode(&empty).unwrap();
    cases.add(
        "array",
        "empty",
        payload,
        format!("{{{}}}", array_expect(empty.view())),
    );

    // Simple frames: built by column (F order) with a range index, and over a C-ordered array
    // with labels.
    let frame = SimpleFrame::from_columns(
        &pool,
        &[
            ("a", &[1.5, 2.5, 3.5]),
            ("b", &[-1.0, 0.0, 1.0]),
            ("a", &[7.0, 8.0, 9.0]),
        ],
        Index::Range {
            start: 10,
            step: -2,
        },
    )
    .unwrap();
    let expect = format!(
        r#"{{{}, "columns": ["a", "b", "a"], "index": [10, 8, 6]}}"#,
        array_expect(frame.data().view())
    );
    let payload = cases.encoder.encode(&frame).unwrap();
    cases.add("frame", "F order, range index", payload, expect);
    let c_array = Array2::from_shape_fn((3, 2), |(i, j)| (i * 2 + j) as i32);
    // The payload holds the block: it must outlive the decoded array (here, no transport
    // keeps the block for the reader).
    let c_payload = cases.block_encoder.encode(&c_array).unwrap();
    let c_shared: ShmArray<i32, Ix2> = cases.decoder.decode(&c_payload).unwrap();
    cases.keep.push(Box::new(c_payload));
    let labelled = SimpleFrame::new(
        c_shared.clone(),
        vec!["x".into(), "y".into()],
        Index::Labels(vec!["r0".into(), "r1".into(), "r2".into()]),
    )
    .unwrap();
    let expect = format!(
        r#"{{{}, "columns": ["x", "y"], "index": ["r0", "r1", "r2"]}}"#,
        array_expect(c_array.view())
    );
    let payload = cases.encoder.encode(&labelled).unwrap();
    cases.add("frame", "C order, labels", payload, expect);

    // Serde values, inline and in a block.
    let small: Vec<u8> = (0..50).collect();
    let large: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    let json_bytes = |v: &[u8]| v.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
    for (label, value) in [("inline bytes", &small), ("bytes in a block", &large)] {
        let payload = cases.encoder.encode(&Serde(value.clone())).unwrap();
        assert_eq!(payload.buffers().len(), usize::from(value.len() > 1 << 20));
        let expect = format!(r#"{{"type": "bytes", "value": [{}]}}"#, json_bytes(value));
        cases.add("serde", label, payload, expect);
    }
    let payload = cases
        .encoder
        .encode(&Serde(("a string".to_owned(), 300u64)))
        .unwrap();
    cases.add(
        "serde",
        "(String, u64)",
        payload,
        r#"{"type": "string-u64", "value": ["a string", 300]}"#.into(),
    );

    // A tuple that nests one.
    let inner = Array2::from_shape_fn((2, 2), |(i, j)| (i + 10 * j) as i64);
    let payload = cases
        .block_encoder
        .encode(&(frame.clone(), (Serde("inner".to_owned()), inner.clone())))
        .unwrap();
    let expect = format!(
        r#"[{{"kind": "frame", "expect": {{{}, "columns": ["a", "b", "a"], "index": [10, 8, 6]}}}},
            {{"kind": "tuple", "expect": [{{"kind": "serde", "expect": {{"type": "string", "value": "inner"}}}},
                                        {{"kind": "array", "expect": {{{}}}}}]}}]"#,
        array_expect(frame.data().view()),
        array_expect(inner.view())
    )
    .replace('\n', " ");
    cases.add("tuple", "nested", payload, expect);

    // Arrow frames: fresh, a fresh slice (compacted), and slices of a received batch sent on
    // (buffers referenced in place, offsets and bit offsets not zero).
    let whole = batch(40);
    let received = {
        let payload = cases.encoder.encode(&ColumnFrame(whole.clone())).unwrap();
        let ColumnFrame(received) = cases.decoder.decode(&payload).unwrap();
        cases.payloads.push(payload);
        received
    };
    for (label, value) in [
        ("fresh", whole.clone()),
        ("fresh slice", whole.slice(3, 17)),
        ("received, sent on", received.clone()),
        ("received slice, sent on", received.slice(5, 21)),
        (
            "received slice of a slice",
            received.slice(9, 30).slice(2, 13),
        ),
    ] {
        let ipc = write_ipc_block(&pool, &value.schema(), std::slice::from_ref(&value)).unwrap();
        let payload = cases.encoder.encode(&ColumnFrame(value.clone())).unwrap();
        let expect = format!(r#"{{"ipc": "{}"}}"#, ipc.to_ref().to_hex());
        cases.add("arrow", label, payload, expect);
        cases.blocks.push(ipc);
    }
    cases.keep.push(Box::new((received, c_shared, labelled)));

    let manifest = std::env::temp_dir().join(format!("shm-reader-{}.jsonl", std::process::id()));
    std::fs::write(&manifest, &cases.manifest).unwrap();
    let blocks: Vec<&ShmBlock> = cases
        .payloads
        .iter()
        .flat_map(|p| p.blocks())
        .chain(&cases.blocks)
        .map(|b| &**b)
        .collect();
    assert!(blocks.len() > 10, "{} blocks offered", blocks.len());
    let (mut reader, _link) =
        ChildProcess::spawn_linked(&python, &[READER, manifest.to_str().unwrap()], &blocks);
    let mut stdout = String::new();
    loop {
        let line = reader.read_line_or_end();
        let Some(line) = line else { break };
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = reader.child.wait().unwrap();
    let _ = std::fs::remove_file(&manifest);
    eprintln!("{stdout}");
    assert!(status.success(), "the reader failed: see its report above");
    let checked = cases.payloads.len() - 1;
    assert!(
        stdout.contains(&format!("{checked} of {checked} cases decoded and checked")),
        "{stdout}"
    );
    drop(cases);
    drop(pool);
    clean.end();
}
