//! Every `DataType` arrow-rs can build, through a per-column frame and back: whole, sliced at
//! offsets that leave validity bitmaps at bit offsets, and nested in each other.
//!
//! The cases come from `sample`, which matches `DataType` without a wildcard: a variant added
//! to arrow does not compile here until it has a case, and `every_variant_has_a_case` checks
//! that the list of types exercised names every variant `sample` knows.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::*;
use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::*;
use shm_arrow::ColumnFrame;
use shm_codec::{Decoder, Encoder, Payload};
use shm_core::ShmPool;

fn pool() -> ShmPool {
    ShmPool::new().unwrap()
}

/// `n` values 0, 1, 2, … with a null at every third (when `nullable`).
fn base(n: usize, nullable: bool) -> Int64Array {
    (0..n as i64)
        .map(|i| (!nullable || i % 3 != 1).then_some(i))
        .collect()
}

/// Every third slot null.
fn nulls(n: usize) -> Option<NullBuffer> {
    Some(NullBuffer::from_iter((0..n).map(|i| i % 3 != 2)))
}

fn field(t: DataType) -> FieldRef {
    Arc::new(Field::new("item", t, true))
}

/// An array of `n` values of type `t`, nulls included where the type has a validity bitmap.
/// The match names every variant of `DataType` (no wildcard) so that a new one is caught.
fn sample(t: &DataType, n: usize) -> ArrayRef {
    let via = |from: &dyn Array| cast(from, t).unwrap();
    match t {
        DataType::Null => Arc::new(NullArray::new(n)),
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float16
        | DataType::Float32
        | DataType::Float64
        | DataType::Timestamp(_, _)
        | DataType::Date64
        | DataType::Duration(_)
        | DataType::Decimal32(_, _)
        | DataType::Decimal64(_, _)
        | DataType::Decimal128(_, _)
        | DataType::Decimal256(_, _) => via(&base(n, true)),
        DataType::Date32 | DataType::Time32(_) => {
            via(&cast(&base(n, true), &DataType::Int32).unwrap())
        }
        DataType::Time64(_) => via(&base(n, true)),
        DataType::Interval(IntervalUnit::YearMonth) => Arc::new(
            base(n, true)
                .iter()
                .map(|v| v.map(|v| v as i32))
                .collect::<IntervalYearMonthArray>(),
        ),
        DataType::Interval(IntervalUnit::DayTime) => Arc::new(
            base(n, true)
                .iter()
                .map(|v| v.map(|v| IntervalDayTime::new(v as i32, -(v as i32))))
                .collect::<IntervalDayTimeArray>(),
        ),
        DataType::Interval(IntervalUnit::MonthDayNano) => Arc::new(
            base(n, true)
                .iter()
                .map(|v| v.map(|v| IntervalMonthDayNano::new(v as i32, 1, v)))
                .collect::<IntervalMonthDayNanoArray>(),
        ),
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => {
            let strings: StringArray = base(n, true)
                .iter()
                .map(|v| v.map(|v| format!("value number {v} of {n}")))
                .collect();
            via(&strings)
        }
        DataType::FixedSizeBinary(width) => {
            let width = *width as usize;
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    base(n, true)
                        .iter()
                        .map(|v| v.map(|v| vec![v as u8; width])),
                    width as i32,
                )
                .unwrap(),
            )
        }
        DataType::List(f) => {
            let child = sample(f.data_type(), 2 * n);
            Arc::new(ListArray::new(
                f.clone(),
                OffsetBuffer::new((0..=n as i32).map(|i| 2 * i).collect()),
                child,
                nulls(n),
            ))
        }
        DataType::LargeList(f) => {
            let child = sample(f.data_type(), 2 * n);
            Arc::new(LargeListArray::new(
                f.clone(),
                OffsetBuffer::new((0..=n as i64).map(|i| 2 * i).collect()),
                child,
                nulls(n),
            ))
        }
        DataType::ListView(f) => {
            // Views in reverse order, of sizes 0, 1 and 2: offsets need not increase.
            let child = sample(f.data_type(), 2 * n);
            let offsets: ScalarBuffer<i32> = (0..n as i32).rev().map(|i| 2 * i).collect();
            let sizes: ScalarBuffer<i32> = (0..n as i32).map(|i| i % 3).collect();
            Arc::new(ListViewArray::new(
                f.clone(),
                offsets,
                sizes,
                child,
                nulls(n),
            ))
        }
        DataType::LargeListView(f) => {
            let child = sample(f.data_type(), 2 * n);
            let offsets: ScalarBuffer<i64> = (0..n as i64).rev().map(|i| 2 * i).collect();
            let sizes: ScalarBuffer<i64> = (0..n as i64).map(|i| i % 3).collect();
            Arc::new(LargeListViewArray::new(
                f.clone(),
                offsets,
                sizes,
                child,
                nulls(n),
            ))
        }
        DataType::FixedSizeList(f, size) => {
            let child = sample(f.data_type(), *size as usize * n);
            Arc::new(FixedSizeListArray::new(f.clone(), *size, child, nulls(n)))
        }
        DataType::Struct(fields) => {
            let children = fields.iter().map(|f| sample(f.data_type(), n)).collect();
            Arc::new(StructArray::new(fields.clone(), children, nulls(n)))
        }
        DataType::Union(fields, mode) => {
            let ids: Vec<i8> = fields.iter().map(|(id, _)| id).collect();
            let type_ids: ScalarBuffer<i8> = (0..n).map(|i| ids[i % ids.len()]).collect();
            let (offsets, children) = match mode {
                UnionMode::Sparse => (
                    None,
                    fields
                        .iter()
                        .map(|(_, f)| sample(f.data_type(), n))
                        .collect(),
                ),
                UnionMode::Dense => {
                    let offsets: ScalarBuffer<i32> =
                        (0..n).map(|i| (i / ids.len()) as i32).collect();
                    let per_child = n.div_ceil(ids.len());
                    let children = fields
                        .iter()
                        .map(|(_, f)| sample(f.data_type(), per_child))
                        .collect();
                    (Some(offsets), children)
                }
            };
            Arc::new(UnionArray::try_new(fields.clone(), type_ids, offsets, children).unwrap())
        }
        DataType::Dictionary(key, value) => {
            let values = sample(value, 5);
            let keys = cast(&base(n, true), &DataType::Int64).unwrap();
            let keys: Int64Array = keys
                .as_primitive::<Int64Type>()
                .iter()
                .map(|k| k.map(|k| k % 5))
                .collect();
            let keys = cast(&keys, key).unwrap();
            let data = keys
                .to_data()
                .into_builder()
                .data_type(t.clone())
                .child_data(vec![values.to_data()])
                .build()
                .unwrap();
            make_array(data)
        }
        DataType::Map(entries, _) => {
            let DataType::Struct(kv) = entries.data_type() else {
                unreachable!("a map's entries are a struct")
            };
            let keys = {
                let k = cast(&base(2 * n, false), &DataType::Utf8).unwrap();
                cast(&k, kv[0].data_type()).unwrap()
            };
            let values = sample(kv[1].data_type(), 2 * n);
            let entries_array = StructArray::new(kv.clone(), vec![keys, values], None);
            Arc::new(MapArray::new(
                entries.clone(),
                OffsetBuffer::new((0..=n as i32).map(|i| 2 * i).collect()),
                entries_array,
                nulls(n),
                false,
            ))
        }
        DataType::RunEndEncoded(runs, values) => {
            // Runs of two; a last run of one when `n` is odd.
            let ends: Vec<i64> = (1..=n.div_ceil(2) as i64)
                .map(|r| (2 * r).min(n as i64))
                .collect();
            let ends = cast(&Int64Array::from(ends), runs.data_type()).unwrap();
            let values = sample(values.data_type(), ends.len());
            let data = ArrayData::builder(t.clone())
                .len(n)
                .child_data(vec![ends.to_data(), values.to_data()])
                .build()
                .unwrap();
            make_array(data)
        }
    }
}

fn union_fields(types: Vec<DataType>) -> UnionFields {
    UnionFields::try_new(
        (0..types.len() as i8).map(|i| i * 2 + 1),
        types
            .into_iter()
            .enumerate()
            .map(|(i, t)| Field::new(format!("u{i}"), t, true)),
    )
    .unwrap()
}

fn ree(runs: DataType, values: DataType) -> DataType {
    DataType::RunEndEncoded(
        Arc::new(Field::new("run_ends", runs, false)),
        Arc::new(Field::new("values", values, true)),
    )
}

fn map_of(value: DataType) -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(Fields::from(vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", value, true),
            ])),
            false,
        )),
        false,
    )
}

/// The types exercised: every variant, every unit, and nested combinations.
fn all_types() -> Vec<DataType> {
    use DataType::*;
    let dict = |k: DataType, v: DataType| Dictionary(Box::new(k), Box::new(v));
    let mut types = vec![
        Null,
        Boolean,
        Int8,
        Int16,
        Int32,
        Int64,
        UInt8,
        UInt16,
        UInt32,
        UInt64,
        Float16,
        Float32,
        Float64,
        Date32,
        Date64,
        Utf8,
        LargeUtf8,
        Utf8View,
        Binary,
        LargeBinary,
        BinaryView,
        FixedSizeBinary(3),
        Decimal32(9, 2),
        Decimal64(18, 3),
        Decimal128(38, 4),
        Decimal256(76, -2),
        Timestamp(TimeUnit::Second, None),
        Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Timestamp(TimeUnit::Microsecond, Some("Europe/Zurich".into())),
        Timestamp(TimeUnit::Nanosecond, None),
        Time32(TimeUnit::Second),
        Time32(TimeUnit::Millisecond),
        Time64(TimeUnit::Microsecond),
        Time64(TimeUnit::Nanosecond),
        Duration(TimeUnit::Second),
        Duration(TimeUnit::Nanosecond),
        Interval(IntervalUnit::YearMonth),
        Interval(IntervalUnit::DayTime),
        Interval(IntervalUnit::MonthDayNano),
        List(field(Int32)),
        LargeList(field(Utf8)),
        ListView(field(Float64)),
        LargeListView(field(LargeBinary)),
        FixedSizeList(field(Int16), 3),
        Struct(Fields::from(vec![
            Field::new("a", Int32, true),
            Field::new("b", Utf8View, true),
        ])),
        Union(union_fields(vec![Int32, Utf8, Float64]), UnionMode::Sparse),
        Union(union_fields(vec![Int32, Utf8, Float64]), UnionMode::Dense),
        dict(Int8, Utf8),
        dict(UInt32, LargeUtf8),
        dict(Int64, Float64),
        map_of(Int64),
        ree(Int16, Int32),
        ree(Int32, Utf8),
        ree(Int64, Float64),
    ];
    // Nested combinations of the above.
    types.extend([
        List(field(Struct(Fields::from(vec![
            Field::new(
                "u",
                Union(union_fields(vec![Int8, Utf8]), UnionMode::Dense),
                true,
            ),
            Field::new("r", ree(Int32, Utf8), true),
        ])))),
        Struct(Fields::from(vec![
            Field::new("lv", ListView(field(dict(Int16, Utf8))), true),
            Field::new("m", map_of(List(field(Int32))), true),
        ])),
        Union(
            union_fields(vec![
                List(field(Utf8View)),
                Struct(Fields::from(vec![Field::new("x", Boolean, true)])),
            ]),
            UnionMode::Sparse,
        ),
        Union(
            union_fields(vec![
                LargeListView(field(Int64)),
                FixedSizeList(field(Utf8), 2),
            ]),
            UnionMode::Dense,
        ),
        ree(Int32, List(field(Int32))),
        dict(
            Int32,
            Struct(Fields::from(vec![Field::new("s", Utf8, true)])),
        ),
        FixedSizeList(field(ListView(field(BinaryView))), 2),
        LargeList(field(map_of(Decimal128(20, 5)))),
    ]);
    types
}

/// The frame's round trip, encoding with `writer`: encode, the wire form, decode. The payload
/// holds the blocks; `writer` must outlive whatever is re-sent from the result.
fn round_trip(writer: &ShmPool, array: &ArrayRef) -> (ArrayRef, Payload) {
    let batch = RecordBatch::try_from_iter([("c", Arc::clone(array))]).unwrap();
    let payload = Encoder::new(writer.clone())
        .encode(&ColumnFrame(batch))
        .unwrap();
    let received = Payload::from_bytes(&payload.to_bytes()).unwrap();
    let ColumnFrame(back) = Decoder::new(pool()).decode(&received).unwrap();
    (Arc::clone(back.column(0)), payload)
}

#[test]
fn every_type_round_trips_whole_and_sliced() {
    let n = 37;
    let writer = pool();
    for t in all_types() {
        let array = sample(&t, n);
        assert_eq!(array.data_type(), &t);
        for (offset, len) in [(0, n), (3, n - 5), (9, 1), (n, 0), (1, n - 1)] {
            let slice = array.slice(offset, len);
            let (back, _) = round_trip(&writer, &slice);
            assert_eq!(back.len(), len, "{t} [{offset}; {len}]");
            assert_eq!(&back, &slice, "{t} [{offset}; {len}]");
            // Twice: a slice of what came back, sent on.
            let again = back.slice(len.min(1), len.saturating_sub(1));
            let (resent, payload) = round_trip(&writer, &again);
            assert_eq!(&resent, &again, "{t} [{offset}; {len}] re-sent");
            drop((resent, payload, back));
        }
    }
}

#[test]
fn every_variant_has_a_case() {
    let covered: BTreeSet<String> = all_types().iter().map(variant).collect();
    // Every name `variant` can return, i.e. every variant of `DataType`.
    let every = [
        "Null",
        "Boolean",
        "Int8",
        "Int16",
        "Int32",
        "Int64",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "Float16",
        "Float32",
        "Float64",
        "Timestamp",
        "Date32",
        "Date64",
        "Time32",
        "Time64",
        "Duration",
        "Interval",
        "Binary",
        "FixedSizeBinary",
        "LargeBinary",
        "BinaryView",
        "Utf8",
        "LargeUtf8",
        "Utf8View",
        "List",
        "ListView",
        "FixedSizeList",
        "LargeList",
        "LargeListView",
        "Struct",
        "Union",
        "Dictionary",
        "Decimal32",
        "Decimal64",
        "Decimal128",
        "Decimal256",
        "Map",
        "RunEndEncoded",
    ];
    let missing: Vec<_> = every.iter().filter(|v| !covered.contains(**v)).collect();
    assert!(missing.is_empty(), "no case for {missing:?}");
}

/// The name of a type's variant; exhaustive, so a new variant of arrow's must be named here.
fn variant(t: &DataType) -> String {
    use DataType::*;
    match t {
        Null => "Null",
        Boolean => "Boolean",
        Int8 => "Int8",
        Int16 => "Int16",
        Int32 => "Int32",
        Int64 => "Int64",
        UInt8 => "UInt8",
        UInt16 => "UInt16",
        UInt32 => "UInt32",
        UInt64 => "UInt64",
        Float16 => "Float16",
        Float32 => "Float32",
        Float64 => "Float64",
        Timestamp(..) => "Timestamp",
        Date32 => "Date32",
        Date64 => "Date64",
        Time32(_) => "Time32",
        Time64(_) => "Time64",
        Duration(_) => "Duration",
        Interval(_) => "Interval",
        Binary => "Binary",
        FixedSizeBinary(_) => "FixedSizeBinary",
        LargeBinary => "LargeBinary",
        BinaryView => "BinaryView",
        Utf8 => "Utf8",
        LargeUtf8 => "LargeUtf8",
        Utf8View => "Utf8View",
        List(_) => "List",
        ListView(_) => "ListView",
        FixedSizeList(..) => "FixedSizeList",
        LargeList(_) => "LargeList",
        LargeListView(_) => "LargeListView",
        Struct(_) => "Struct",
        Union(..) => "Union",
        Dictionary(..) => "Dictionary",
        Decimal32(..) => "Decimal32",
        Decimal64(..) => "Decimal64",
        Decimal128(..) => "Decimal128",
        Decimal256(..) => "Decimal256",
        Map(..) => "Map",
        RunEndEncoded(..) => "RunEndEncoded",
    }
    .to_owned()
}

/// Bytes of shared memory a payload's blocks hold.
fn shared_bytes(payload: &Payload) -> u64 {
    payload.buffers().iter().map(|r| r.content_size).sum()
}

#[test]
fn a_slice_carries_only_its_own_values() {
    let rows = 100_000;
    let writer = pool();
    for t in [
        DataType::Utf8,
        DataType::LargeUtf8,
        DataType::Utf8View,
        DataType::Binary,
        DataType::LargeBinary,
        DataType::BinaryView,
        DataType::List(field(DataType::Int64)),
        DataType::LargeList(field(DataType::Utf8)),
        DataType::ListView(field(DataType::Int64)),
        DataType::LargeListView(field(DataType::Utf8)),
        DataType::Int64,
    ] {
        let whole = sample(&t, rows);
        let slice = whole.slice(50_000, 10);
        let (back, payload) = round_trip(&writer, &slice);
        assert_eq!(&back, &slice, "{t}");
        let (_, whole_payload) = round_trip(&writer, &whole);
        let (sent, all) = (shared_bytes(&payload), shared_bytes(&whole_payload));
        // Ten rows of at most two 30-byte strings each, their offsets and bitmaps, padded to
        // 64-byte boundaries: well under 2 KiB, whatever the type.
        assert!(
            sent < 2048,
            "{t}: a 10-row slice sent {sent} bytes (all rows: {all})"
        );
        eprintln!("{t}: 10 of {rows} rows: {sent} bytes; all rows: {all} bytes");
    }
}
