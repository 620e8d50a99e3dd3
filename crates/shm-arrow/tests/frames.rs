//! Per-column frames and IPC blocks: every Arrow type, slices, edge shapes, re-sending, the
//! reference design's failures 5–8, and bad input.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::*;
use arrow::buffer::{Buffer, ScalarBuffer};
use arrow::datatypes::*;
use shm_arrow::{
    ColumnFrame, ColumnsCodec, decode_projection, decode_trusted, read_ipc_block, write_ipc_block,
};
use shm_codec::{CodecError, Decoder, Encoder, Payload, Pieces, Registry, Source};
use shm_core::ShmPool;

fn pool() -> ShmPool {
    ShmPool::new().unwrap()
}

fn codecs() -> (Encoder, Decoder) {
    (Encoder::new(pool()), Decoder::new(pool()))
}

fn round_trip(c: &(Encoder, Decoder), batch: &RecordBatch) -> RecordBatch {
    let payload = c.0.encode(&ColumnFrame(batch.clone())).unwrap();
    let received = Payload::from_bytes(&payload.to_bytes()).unwrap();
    let ColumnFrame(back) = c.1.decode(&received).unwrap();
    back
}

fn col(array: impl Array + 'static) -> ArrayRef {
    Arc::new(array)
}

/// One column of every type the frame supports, most with nulls.
fn every_type() -> RecordBatch {
    let n = 7;
    let tz: Arc<str> = "Europe/Zurich".into();
    let strings = vec![
        Some("a"),
        None,
        Some("ünïcode"),
        Some(""),
        Some("a much longer string than twelve"),
        None,
        Some("z"),
    ];
    let list = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
        Some(vec![Some(1), None]),
        None,
        Some(vec![]),
        Some(vec![Some(4)]),
        Some(vec![Some(5), Some(6), Some(7)]),
        None,
        Some(vec![Some(8)]),
    ]);
    let large_list = LargeListArray::from_iter_primitive::<Float64Type, _, _>(vec![
        Some(vec![Some(1.5)]),
        Some(vec![]),
        None,
        Some(vec![Some(2.5), None]),
        Some(vec![Some(3.5)]),
        Some(vec![]),
        None,
    ]);
    let fixed_list = FixedSizeListArray::from_iter_primitive::<Int16Type, _, _>(
        (0..n).map(|i| {
            if i == 2 {
                None
            } else {
                Some(vec![Some(i as i16), Some(-(i as i16))])
            }
        }),
        2,
    );
    let structs = StructArray::from(vec![
        (
            Arc::new(Field::new("p", DataType::Int64, true)),
            col(Int64Array::from(vec![
                Some(1),
                None,
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
            ])),
        ),
        (
            Arc::new(Field::new("q", DataType::Utf8, true)),
            col(StringArray::from(strings.clone())),
        ),
    ]);
    let map = {
        let mut builder = MapBuilder::new(None, StringBuilder::new(), Int32Builder::new());
        for i in 0..n {
            if i == 1 {
                builder.append(false).unwrap();
                continue;
            }
            for j in 0..i % 3 {
                builder.keys().append_value(format!("k{j}"));
                builder.values().append_value((i * 10 + j) as i32);
            }
            builder.append(true).unwrap();
        }
        builder.finish()
    };
    let dict8: DictionaryArray<Int8Type> = vec![
        Some("x"),
        Some("y"),
        None,
        Some("x"),
        Some("z"),
        Some("y"),
        Some("x"),
    ]
    .into_iter()
    .collect();
    let dict16: DictionaryArray<UInt16Type> = vec!["lo", "hi", "lo", "lo", "hi", "mid", "lo"]
        .into_iter()
        .collect();
    let dict_i64_values: DictionaryArray<Int32Type> = DictionaryArray::try_new(
        Int32Array::from(vec![0, 1, 1, 0, 2, 2, 0]),
        col(Int64Array::from(vec![100, 200, 300])),
    )
    .unwrap();
    let fields_and_columns: Vec<(Field, ArrayRef)> = vec![
        (
            Field::new("i8", DataType::Int8, true),
            col(Int8Array::from(vec![
                Some(-1),
                None,
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(i8::MIN),
            ])),
        ),
        (
            Field::new("i16", DataType::Int16, false),
            col(Int16Array::from(vec![1, 2, 3, 4, 5, 6, i16::MAX])),
        ),
        (
            Field::new("i32", DataType::Int32, true),
            col(Int32Array::from(vec![
                Some(1),
                None,
                None,
                Some(4),
                Some(5),
                Some(6),
                Some(7),
            ])),
        ),
        (
            Field::new("i64", DataType::Int64, true),
            col(Int64Array::from(vec![
                Some(1),
                Some(2),
                None,
                Some(4),
                Some(5),
                Some(6),
                Some(i64::MIN),
            ])),
        ),
        (
            Field::new("u8", DataType::UInt8, false),
            col(UInt8Array::from(vec![1, 2, 3, 4, 5, 6, 255])),
        ),
        (
            Field::new("u16", DataType::UInt16, false),
            col(UInt16Array::from(vec![1, 2, 3, 4, 5, 6, 7])),
        ),
        (
            Field::new("u32", DataType::UInt32, true),
            col(UInt32Array::from(vec![
                None,
                Some(2),
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
            ])),
        ),
        (
            Field::new("u64", DataType::UInt64, false),
            col(UInt64Array::from(vec![1, 2, 3, 4, 5, 6, u64::MAX])),
        ),
        (
            Field::new("f16", DataType::Float16, true),
            col(Float16Array::from(vec![
                Some(half::f16::from_f32(1.5)),
                None,
                Some(half::f16::from_f32(-2.0)),
                Some(half::f16::ZERO),
                Some(half::f16::ONE),
                None,
                Some(half::f16::MAX),
            ])),
        ),
        (
            Field::new("f32", DataType::Float32, true),
            col(Float32Array::from(vec![
                Some(1.5),
                None,
                Some(f32::NAN),
                Some(0.0),
                Some(-0.0),
                Some(f32::INFINITY),
                Some(3.25),
            ])),
        ),
        (
            Field::new("f64", DataType::Float64, true),
            col(Float64Array::from(vec![
                Some(1.5),
                Some(2.5),
                None,
                Some(0.0),
                Some(1e300),
                Some(-1e-300),
                Some(7.0),
            ])),
        ),
        (
            Field::new("bool", DataType::Boolean, true),
            col(BooleanArray::from(vec![
                Some(true),
                None,
                Some(false),
                Some(true),
                Some(true),
                None,
                Some(false),
            ])),
        ),
        (
            Field::new("utf8", DataType::Utf8, true),
            col(StringArray::from(strings.clone())),
        ),
        (
            Field::new("large_utf8", DataType::LargeUtf8, true),
            col(LargeStringArray::from(strings.clone())),
        ),
        (
            Field::new("binary", DataType::Binary, true),
            col(BinaryArray::from_opt_vec(
                strings.iter().map(|s| s.map(str::as_bytes)).collect(),
            )),
        ),
        (
            Field::new("large_binary", DataType::LargeBinary, true),
            col(LargeBinaryArray::from_opt_vec(
                strings.iter().map(|s| s.map(str::as_bytes)).collect(),
            )),
        ),
        (
            Field::new("utf8_view", DataType::Utf8View, true),
            col(StringViewArray::from(strings.clone())),
        ),
        (
            Field::new("binary_view", DataType::BinaryView, true),
            col(BinaryViewArray::from(
                strings
                    .iter()
                    .map(|s| s.map(str::as_bytes))
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            Field::new("fixed_binary", DataType::FixedSizeBinary(3), true),
            col(FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                (0..n).map(|i| (i != 3).then_some([i as u8, 1, 2])),
                3,
            )
            .unwrap()),
        ),
        (
            Field::new("date32", DataType::Date32, true),
            col(Date32Array::from(vec![
                Some(0),
                Some(19_000),
                None,
                Some(-5),
                Some(1),
                Some(2),
                Some(3),
            ])),
        ),
        (
            Field::new("date64", DataType::Date64, false),
            col(Date64Array::from(vec![0, 86_400_000, 2, 3, 4, 5, 6])),
        ),
        (
            Field::new("time32s", DataType::Time32(TimeUnit::Second), false),
            col(Time32SecondArray::from(vec![0, 1, 2, 3, 4, 5, 86_399])),
        ),
        (
            Field::new("time32ms", DataType::Time32(TimeUnit::Millisecond), false),
            col(Time32MillisecondArray::from(vec![0, 1, 2, 3, 4, 5, 6])),
        ),
        (
            Field::new("time64us", DataType::Time64(TimeUnit::Microsecond), false),
            col(Time64MicrosecondArray::from(vec![0, 1, 2, 3, 4, 5, 6])),
        ),
        (
            Field::new("time64ns", DataType::Time64(TimeUnit::Nanosecond), true),
            col(Time64NanosecondArray::from(vec![
                Some(0),
                None,
                Some(2),
                Some(3),
                Some(4),
                Some(5),
                Some(6),
            ])),
        ),
        (
            Field::new("ts_s", DataType::Timestamp(TimeUnit::Second, None), false),
            col(TimestampSecondArray::from(vec![0, 1, 2, 3, 4, 5, 6])),
        ),
        (
            Field::new(
                "ts_ms_tz",
                DataType::Timestamp(TimeUnit::Millisecond, Some(tz.clone())),
                true,
            ),
            col(TimestampMillisecondArray::from(vec![
                Some(0),
                None,
                Some(2),
                Some(3),
                Some(4),
                Some(5),
                Some(6),
            ])
            .with_timezone(tz.clone())),
        ),
        (
            Field::new(
                "ts_us",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            col(TimestampMicrosecondArray::from(vec![0, 1, 2, 3, 4, 5, 6])),
        ),
        (
            Field::new(
                "ts_ns_tz",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
            col(
                TimestampNanosecondArray::from(vec![0, 1, 2, 3, 4, 5, 1_700_000_000_000_000_000])
                    .with_timezone("UTC"),
            ),
        ),
        (
            Field::new("duration", DataType::Duration(TimeUnit::Millisecond), true),
            col(DurationMillisecondArray::from(vec![
                Some(0),
                Some(-1),
                None,
                Some(3),
                Some(4),
                Some(5),
                Some(6),
            ])),
        ),
        (
            Field::new(
                "interval_ym",
                DataType::Interval(IntervalUnit::YearMonth),
                false,
            ),
            col(IntervalYearMonthArray::from(vec![0, 1, 2, 3, 4, 5, 12])),
        ),
        (
            Field::new(
                "interval_dt",
                DataType::Interval(IntervalUnit::DayTime),
                false,
            ),
            col(IntervalDayTimeArray::from(vec![
                IntervalDayTime::new(1, 2);
                7
            ])),
        ),
        (
            Field::new(
                "interval_mdn",
                DataType::Interval(IntervalUnit::MonthDayNano),
                true,
            ),
            col(IntervalMonthDayNanoArray::from(vec![
                Some(IntervalMonthDayNano::new(1, 2, 3)),
                None,
                Some(IntervalMonthDayNano::new(0, 0, 0)),
                None,
                Some(IntervalMonthDayNano::new(-1, 5, 9)),
                None,
                None,
            ])),
        ),
        (
            Field::new("decimal128", DataType::Decimal128(20, 4), true),
            col(Decimal128Array::from(vec![
                Some(12_345),
                None,
                Some(-1),
                Some(0),
                Some(1),
                Some(2),
                Some(99_999),
            ])
            .with_precision_and_scale(20, 4)
            .unwrap()),
        ),
        (
            Field::new("decimal256", DataType::Decimal256(40, 2), false),
            col(Decimal256Array::from(vec![
                i256::from_i128(1),
                i256::from_i128(-2),
                i256::MAX,
                i256::ZERO,
                i256::ONE,
                i256::from_i128(5),
                i256::MINUS_ONE,
            ])
            .with_precision_and_scale(40, 2)
            .unwrap_or_else(|_| {
                Decimal256Array::from(vec![i256::ZERO; 7])
                    .with_precision_and_scale(40, 2)
                    .unwrap()
            })),
        ),
        (
            Field::new("dict8", dict8.data_type().clone(), true),
            col(dict8),
        ),
        (
            Field::new(
                "dict16",
                DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8)),
                false,
            ),
            col(dict16),
        ),
        (
            Field::new(
                "dict_int_values",
                dict_i64_values.data_type().clone(),
                false,
            ),
            col(dict_i64_values),
        ),
        (
            Field::new("list", list.data_type().clone(), true),
            col(list),
        ),
        (
            Field::new("large_list", large_list.data_type().clone(), true),
            col(large_list),
        ),
        (
            Field::new("fixed_list", fixed_list.data_type().clone(), true),
            col(fixed_list),
        ),
        (
            Field::new("struct", structs.data_type().clone(), true),
            col(structs),
        ),
        (Field::new("map", map.data_type().clone(), true), col(map)),
        (
            Field::new("null", DataType::Null, true),
            col(NullArray::new(n)),
        ),
    ];
    let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = fields_and_columns.into_iter().unzip();
    let fields: Vec<Field> = fields
        .into_iter()
        .map(|f| f.with_metadata(HashMap::from([("unit".to_owned(), "m".to_owned())])))
        .collect();
    let schema = Schema::new_with_metadata(
        fields,
        HashMap::from([("source".to_owned(), "test".to_owned())]),
    );
    RecordBatch::try_new(Arc::new(schema), columns).unwrap()
}

#[test]
fn every_type_round_trips_with_nulls_and_metadata() {
    let c = codecs();
    let batch = every_type();
    let back = round_trip(&c, &batch);
    assert_eq!(
        back.schema(),
        batch.schema(),
        "schema, field and schema metadata"
    );
    for (i, (a, b)) in batch.columns().iter().zip(back.columns()).enumerate() {
        assert_eq!(
            a.to_data(),
            b.to_data(),
            "column {} ({})",
            i,
            batch.schema().field(i).name()
        );
    }
    assert_eq!(back, batch);
}

#[test]
fn a_received_frame_names_its_codec_without_an_allocation() {
    let c = codecs();
    let batch = RecordBatch::try_from_iter([("x", col(Int8Array::from(vec![1, 2])))]).unwrap();
    let payload = c.0.encode(&ColumnFrame(batch)).unwrap();
    let received = Payload::from_bytes(&payload.to_bytes()).unwrap();
    assert_eq!(received.codec, shm_arrow::COLUMNS_CODEC);
    assert!(matches!(received.codec, std::borrow::Cow::Borrowed(_)));
}

#[test]
fn decoded_buffers_point_into_shared_memory() {
    let c = codecs();
    let batch = RecordBatch::try_from_iter([(
        "x",
        col(Float64Array::from_iter_values((0..100_000).map(f64::from))),
    )])
    .unwrap();
    let payload = c.0.encode(&ColumnFrame(batch.clone())).unwrap();
    let ColumnFrame(back) = c.1.decode(&payload).unwrap();
    let values = back.column(0).to_data().buffers()[0].clone();
    assert!(
        c.0.block_holding(values.as_ptr(), values.len()).is_some(),
        "the decoded values are a view of a block, not a copy"
    );
    assert_eq!(values.as_ptr() as usize % 64, 0, "64-byte aligned");
}

#[test]
fn sliced_arrays_round_trip_as_the_slice() {
    let c = codecs();
    let batch = every_type();
    for (offset, len) in [(1, 5), (3, 4), (6, 1), (2, 0)] {
        let slice = batch.slice(offset, len);
        let back = round_trip(&c, &slice);
        assert_eq!(back, slice, "slice {offset}+{len}");
    }
    // Bit offsets that are not multiples of 8.
    let bools = BooleanArray::from(
        (0..100)
            .map(|i| (i % 7 != 0).then_some(i % 3 == 0))
            .collect::<Vec<_>>(),
    );
    let sliced = bools.slice(13, 50);
    let batch = RecordBatch::try_from_iter([("b", col(sliced))]).unwrap();
    assert_eq!(round_trip(&c, &batch), batch);
}

#[test]
fn empty_batches_column_less_batches_and_duplicate_names_work() {
    // Reference failure 7: duplicate column names failed.
    let c = codecs();
    let empty = every_type().slice(0, 0);
    assert_eq!(round_trip(&c, &empty), empty);

    let no_columns = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(42)),
    )
    .unwrap();
    let back = round_trip(&c, &no_columns);
    assert_eq!((back.num_rows(), back.num_columns()), (42, 0));

    let schema = Schema::new(vec![
        Field::new("a", DataType::Int32, false),
        Field::new("a", DataType::Utf8, false),
    ]);
    let dup = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            col(Int32Array::from(vec![1, 2])),
            col(StringArray::from(vec!["x", "y"])),
        ],
    )
    .unwrap();
    assert_eq!(round_trip(&c, &dup), dup);
}

#[test]
fn nulls_in_strings_and_integers_stay_nulls_of_their_type() {
    // Reference failures 5 and 6: None became the string 'None'; nullable ints became float64.
    let c = codecs();
    let batch = RecordBatch::try_from_iter([
        ("s", col(StringArray::from(vec![Some("None"), None]))),
        ("i", col(Int64Array::from(vec![None, Some(i64::MAX)]))),
    ])
    .unwrap();
    let back = round_trip(&c, &batch);
    let s = back.column(0).as_string::<i32>();
    assert_eq!((s.value(0), s.is_null(1)), ("None", true));
    assert_eq!(back.column(1).data_type(), &DataType::Int64);
    assert_eq!(
        back.column(1).as_primitive::<Int64Type>().value(1),
        i64::MAX
    );
    assert!(back.column(1).is_null(0));
}

#[test]
fn resent_batches_reference_their_blocks_and_carry_only_current_columns() {
    // Reference failure 8: a re-sent frame sent stale data.
    let (encoder, decoder) = codecs();
    let batch = every_type();
    let first = encoder.encode(&ColumnFrame(batch.clone())).unwrap();
    let ColumnFrame(received) = decoder.decode(&first).unwrap();

    // Sent on unchanged: every buffer is referenced where it lies, no new block.
    let resender = Encoder::new(decoder.pool().clone());
    let created = resender.pool().stats().segments_created;
    let again = resender.encode(&ColumnFrame(received.clone())).unwrap();
    assert_eq!(
        resender.pool().stats().segments_created,
        created,
        "nothing was copied"
    );
    let names = |p: &Payload| {
        p.buffers()
            .iter()
            .map(|r| r.name.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(names(&again).is_subset(&names(&first)));
    let ColumnFrame(back) = decoder.decode(&again).unwrap();
    assert_eq!(back, batch);

    // Changed: one column replaced, one removed, two swapped.
    let mut columns = received.columns().to_vec();
    let mut fields: Vec<FieldRef> = received.schema().fields().iter().cloned().collect();
    columns[0] = col(Int8Array::from(vec![9; 7]));
    columns.remove(5);
    fields.remove(5);
    columns.swap(1, 2);
    fields.swap(1, 2);
    let changed = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    let sent = resender.encode(&ColumnFrame(changed.clone())).unwrap();
    let ColumnFrame(back) = decoder.decode(&sent).unwrap();
    assert_eq!(back, changed, "exactly the current content");
    assert_eq!(back.column(0).as_primitive::<Int8Type>().value(3), 9);
}

/// Attaches as the default decoder does, counting the references it was asked for.
#[derive(Default)]
struct Counting {
    attached: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl shm_codec::Attacher for Counting {
    fn attach(
        &self,
        pool: &ShmPool,
        r: &shm_core::ShmRef,
    ) -> shm_core::Result<Arc<shm_core::ShmBlock>> {
        self.attached.lock().unwrap().insert(r.to_hex());
        pool.attach(r).map(Arc::new)
    }
}

#[test]
fn a_projection_decodes_only_the_chosen_columns() {
    let (encoder, _) = codecs();
    let counting = Arc::new(Counting::default());
    let decoder = Decoder::with_attacher(pool(), counting.clone());
    let batch = every_type();
    let payload = encoder.encode(&ColumnFrame(batch.clone())).unwrap();
    let projected = decode_projection(&payload, &decoder, &[12, 3]).unwrap();
    assert_eq!(projected.num_columns(), 2);
    assert_eq!(projected.schema().field(0).name(), "utf8");
    assert_eq!(projected.column(0), batch.column(12));
    assert_eq!(projected.column(1), batch.column(3));
    // Narrow columns share blocks; columns larger than a shared block have their own, and
    // only the chosen ones are attached.
    counting.attached.lock().unwrap().clear();
    let large: Vec<ArrayRef> = (0..4)
        .map(|c| Arc::new(Int64Array::from_iter_values(c..c + 100_000)) as ArrayRef)
        .collect();
    let large = RecordBatch::try_from_iter(["a", "b", "c", "d"].into_iter().zip(large)).unwrap();
    let payload = encoder.encode(&ColumnFrame(large.clone())).unwrap();
    assert_eq!(payload.buffers().len(), 4, "a block per large column");
    let projected = decode_projection(&payload, &decoder, &[2, 0]).unwrap();
    assert_eq!(projected.column(0), large.column(2));
    assert_eq!(projected.column(1), large.column(0));
    assert_eq!(
        counting.attached.lock().unwrap().len(),
        2,
        "only two columns' blocks attached"
    );
}

#[test]
fn trusted_decoding_gives_the_same_batch() {
    let (encoder, decoder) = codecs();
    let batch = every_type();
    let payload = encoder.encode(&ColumnFrame(batch.clone())).unwrap();
    // SAFETY: the payload was written by this test from a valid batch.
    let back = unsafe { decode_trusted(&payload, &decoder) }.unwrap();
    assert_eq!(back, batch);
}

#[test]
fn the_registry_carries_record_batches() {
    let (encoder, decoder) = codecs();
    let mut registry = Registry::new();
    registry.register(ColumnsCodec);
    let batch = every_type();
    let payload = registry.encode(&batch, &encoder).unwrap();
    let back: RecordBatch = registry.decode_as(&payload, &decoder).unwrap();
    assert_eq!(back, batch);
}

#[test]
fn ipc_blocks_round_trip_zero_copy() {
    let pool = pool();
    let batch = every_type();
    let block =
        write_ipc_block(&pool, &batch.schema(), &[batch.clone(), batch.slice(2, 3)]).unwrap();
    let reader = Arc::new(pool.attach(&block.to_ref()).unwrap());
    let batches = read_ipc_block(&reader).unwrap();
    assert_eq!(batches, vec![batch.clone(), batch.slice(2, 3)]);
    let values = batches[0].column(10).to_data().buffers()[0].clone();
    let start = reader.as_ptr() as usize;
    let at = values.as_ptr() as usize;
    assert!(
        at >= start && at + values.len() <= start + reader.len(),
        "the decoded buffers are views of the block, not copies"
    );
}

/// A batch whose column data is wrong in one way, built without Arrow's checks.
fn bad_batch(
    data_type: DataType,
    buffers: Vec<Buffer>,
    children: Vec<ArrayData>,
    len: usize,
) -> RecordBatch {
    let builder = ArrayData::builder(data_type.clone())
        .len(len)
        .buffers(buffers)
        .child_data(children);
    // SAFETY: the array is never read by this process: it only travels, so that the decoder
    // on the other side can be shown to refuse it.
    let data = unsafe { builder.build_unchecked() };
    let schema = Schema::new(vec![Field::new("bad", data_type, true)]);
    RecordBatch::try_new_with_options(
        Arc::new(schema),
        vec![make_array(data)],
        &RecordBatchOptions::new().with_row_count(Some(len)),
    )
    .unwrap()
}

#[test]
fn invalid_column_data_is_a_typed_error() {
    let (encoder, decoder) = codecs();
    let offsets = |v: Vec<i32>| ScalarBuffer::from(v).into_inner();
    let cases = vec![
        (
            "invalid UTF-8",
            bad_batch(
                DataType::Utf8,
                vec![offsets(vec![0, 2]), Buffer::from(vec![0xff, 0xfe])],
                vec![],
                1,
            ),
        ),
        (
            "offsets past the end",
            bad_batch(
                DataType::Utf8,
                vec![offsets(vec![0, 100]), Buffer::from(b"abc".to_vec())],
                vec![],
                1,
            ),
        ),
        (
            "offsets backwards",
            bad_batch(
                DataType::Binary,
                vec![offsets(vec![2, 1]), Buffer::from(b"abc".to_vec())],
                vec![],
                1,
            ),
        ),
        (
            "dictionary key out of range",
            bad_batch(
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                vec![ScalarBuffer::from(vec![0i32, 5]).into_inner()],
                vec![StringArray::from(vec!["only"]).to_data()],
                2,
            ),
        ),
    ];
    for (what, batch) in cases {
        let payload = encoder.encode(&ColumnFrame(batch)).unwrap();
        match decoder.decode::<ColumnFrame>(&payload) {
            Err(CodecError::InvalidData { .. }) => {}
            other => panic!("{what}: expected InvalidData, got {:?}", other.map(|_| ())),
        }
    }

    // Metadata that claims more values than the buffers hold.
    let batch = RecordBatch::try_from_iter([("x", col(Int64Array::from(vec![1, 2])))]).unwrap();
    let mut payload = encoder.encode(&ColumnFrame(batch)).unwrap();
    let mut meta: wire::FrameMeta = postcard::from_bytes(&payload.meta).unwrap();
    meta.columns[0].len = 1000;
    payload.meta = postcard::to_stdvec(&meta).unwrap();
    assert!(matches!(
        decoder.decode::<ColumnFrame>(&payload),
        Err(CodecError::InvalidData { .. })
    ));
    // A buffer that reaches past its block.
    meta.columns[0].len = 2;
    meta.columns[0].buffers[0].len = 1 << 40;
    payload.meta = postcard::to_stdvec(&meta).unwrap();
    assert!(matches!(
        decoder.decode::<ColumnFrame>(&payload),
        Err(CodecError::InvalidData { .. })
    ));
    // A buffer in a block the payload does not have.
    meta.columns[0].buffers[0].len = 16;
    meta.columns[0].buffers[0].block = 7;
    payload.meta = postcard::to_stdvec(&meta).unwrap();
    assert!(matches!(
        decoder.decode::<ColumnFrame>(&payload),
        Err(CodecError::InvalidData { .. })
    ));
}

/// The frame metadata as another implementation would write it (docs/format.md).
mod wire {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct FrameMeta {
        pub schema: Vec<u8>,
        pub rows: u64,
        pub columns: Vec<Node>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Node {
        pub len: u64,
        pub offset: u64,
        pub nulls: Option<Nulls>,
        pub buffers: Vec<BufRef>,
        pub children: Vec<Node>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Nulls {
        pub bits: BufRef,
        pub bit_offset: u64,
        pub null_count: u64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct BufRef {
        pub block: u32,
        pub offset: u64,
        pub len: u64,
    }
}

#[test]
fn thousands_of_mutated_ipc_streams_give_batches_or_errors() {
    let pool = pool();
    let batch = every_type();
    let block = write_ipc_block(&pool, &batch.schema(), std::slice::from_ref(&batch)).unwrap();
    let bytes = block.as_slice().to_vec();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let rounds: usize = std::env::var("SHM_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let (mut decoded, mut refused) = (0, 0);
    for _ in 0..rounds {
        let mut target = pool.alloc(bytes.len()).unwrap();
        let mutated = target.as_mut_slice();
        mutated.copy_from_slice(&bytes);
        for _ in 0..1 + next() % 3 {
            let at = (next() % mutated.len() as u64) as usize;
            mutated[at] = next() as u8;
        }
        match read_ipc_block(&target.freeze()) {
            Ok(batches) => {
                decoded += 1;
                for batch in batches {
                    // What arrow's reader accepted passed its validation: it reads safely.
                    for column in batch.columns() {
                        column.to_data().validate_full().unwrap();
                    }
                }
            }
            Err(CodecError::InvalidData { .. }) => refused += 1,
            Err(other) => panic!("a mutated stream gave {other:?}"),
        }
    }
    assert!(
        decoded > 0 && refused > 0,
        "{decoded} read, {refused} refused"
    );
}

#[test]
fn thousands_of_mutated_frames_give_batches_or_errors() {
    let (encoder, decoder) = codecs();
    let batch = every_type();
    // The payload is kept: its blocks are attachable only while they live.
    let payload = encoder.encode(&ColumnFrame(batch)).unwrap();
    let bytes = payload.to_bytes();
    let mut mutations = shm_tests::Mutations::new(0x9e37_79b9_7f4a_7c15u64, 3000);
    let rounds = mutations.rounds;
    let mut next = move || mutations.draw();
    let mut decoded = 0;
    for _ in 0..rounds {
        let mut mutated = bytes.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % mutated.len() as u64) as usize;
            mutated[at] = next() as u8;
        }
        let Ok(payload) = Payload::from_bytes(&mutated) else {
            continue;
        };
        if let Ok(ColumnFrame(batch)) = decoder.decode(&payload) {
            // A batch that decoded passed Arrow's validation: it can be read safely.
            decoded += 1;
            for column in batch.columns() {
                let options = Default::default();
                if let Ok(formatter) =
                    arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &options)
                {
                    for i in 0..column.len() {
                        std::hint::black_box(formatter.value(i).to_string());
                    }
                }
            }
        }
    }
    assert!(
        decoded > 0,
        "no mutation left a frame decodable: the test mutates too much"
    );
}

#[test]
fn narrow_columns_share_blocks_and_keep_their_values() {
    let (encoder, decoder) = codecs();
    let columns: Vec<(String, ArrayRef)> = (0..10_000)
        .map(|c| {
            let values = Int32Array::from_iter_values([c, -c]);
            (format!("c{c}"), Arc::new(values) as ArrayRef)
        })
        .collect();
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let payload = encoder.encode(&ColumnFrame(batch.clone())).unwrap();
    // 64 bytes each (aligned), 4,096 to a block of 256 KiB.
    assert_eq!(
        payload.buffers().len(),
        3,
        "blocks of a 10,000-column frame"
    );
    let ColumnFrame(back) = decoder.decode(&payload).unwrap();
    assert_eq!(back, batch);
}

/// The bytes of an unwritten block as a data connection sends them: its pieces at their
/// offsets, zeros between.
fn stream_bytes(source: &Source) -> Vec<u8> {
    match source {
        Source::Block(block) => block.as_slice().to_vec(),
        Source::Pieces(pieces) => {
            let mut bytes = vec![0u8; source.len()];
            for (piece, at) in pieces.iter() {
                bytes[at..at + piece.len()].copy_from_slice(piece);
            }
            bytes
        }
    }
}

#[test]
fn a_frame_left_unwritten_is_the_encoded_frame_and_reads_back_from_its_pieces() {
    let (encoder, decoder) = codecs();
    // Columns of every type on the heap, sliced, and columns already in shared memory (a
    // decoded batch's), which stay blocks of their own.
    let batch = every_type();
    let ColumnFrame(live) = decoder
        .decode(&encoder.encode(&ColumnFrame(batch.slice(3, 4))).unwrap())
        .unwrap();
    for (batch, in_place) in [
        (batch.clone(), false),
        (batch.slice(2, 5), false),
        (live, true),
    ] {
        let sender = Encoder::new(decoder.pool().clone());
        let frame = ColumnFrame(batch.clone());
        let unwritten = sender
            .encode_unwritten(&frame)
            .unwrap()
            .expect("a frame can be left unwritten");
        let encoded = sender.encode(&ColumnFrame(batch.clone())).unwrap();
        assert_eq!(unwritten.meta, encoded.meta);
        assert_eq!(unwritten.codec, encoded.codec);
        let blocks = unwritten
            .sources
            .iter()
            .filter(|s| matches!(s, Source::Block(_)))
            .count();
        let expected = if in_place { unwritten.sources.len() } else { 0 };
        assert_eq!(blocks, expected, "{:?}", unwritten.sources);
        let lens: Vec<usize> = unwritten.sources.iter().map(Source::len).collect();
        let encoded_lens: Vec<usize> = encoded.blocks().iter().map(|b| b.len()).collect();
        assert_eq!(lens, encoded_lens);
        // Written here, as a local transport does.
        let written = unwritten.clone().write(&sender).unwrap();
        assert_eq!(written.meta, encoded.meta);
        let ColumnFrame(back) = decoder.decode(&written).unwrap();
        assert_eq!(back, batch);
        // Sent as bytes and placed by a receiver into blocks of its own, as shm-flight does.
        let receiver = pool();
        let blocks = unwritten
            .sources
            .iter()
            .map(|source| {
                let bytes = stream_bytes(source);
                let mut block = receiver.alloc(bytes.len()).unwrap();
                block.as_mut_slice().copy_from_slice(&bytes);
                block.freeze()
            })
            .collect();
        let received = Payload::new(&unwritten.codec, unwritten.meta.clone(), blocks, Vec::new());
        let ColumnFrame(back) = Decoder::new(receiver).decode(&received).unwrap();
        assert_eq!(back, batch);
    }
}

#[test]
fn pieces_refuse_overlaps_and_bytes_past_the_block() {
    let bytes = |n: usize| -> shm_codec::Bytes { Arc::new(vec![1u8; n]) };
    let mut pieces = Pieces::new(100);
    pieces.place(bytes(10), 0).unwrap();
    pieces.place(bytes(10), 64).unwrap();
    for (len, at) in [(10, 70), (10, 20), (40, 80), (1, usize::MAX)] {
        let err = pieces.place(bytes(len), at).unwrap_err();
        assert!(matches!(err, CodecError::Layout { .. }), "{err}");
    }
    assert_eq!(
        pieces
            .iter()
            .map(|(p, at)| (p.len(), at))
            .collect::<Vec<_>>(),
        [(10, 0), (10, 64)]
    );
}
