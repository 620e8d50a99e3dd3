//! A server reading a call whose messages were mutated, cut short, duplicated or reordered:
//! typed errors or values, never a panic, a hang, or a block left behind.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray};
use bytes::Bytes;
use ndarray::Array2;
use shm_arrow::ColumnFrame;
use shm_codec::{Encoder, Serde};
use shm_core::ShmPool;
use shm_flight::fuzzing::{call_messages, receive_call};

fn rounds() -> usize {
    std::env::var("SHM_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

#[test]
fn thousands_of_mutated_calls_give_values_or_errors() {
    let pool = ShmPool::new().expect("pool");
    let encoder = Encoder::new(pool.clone());
    let batch = RecordBatch::try_from_iter([
        (
            "x",
            Arc::new(Float64Array::from_iter_values((0..3000).map(f64::from))) as ArrayRef,
        ),
        (
            "n",
            Arc::new(Int32Array::from_iter(
                (0..3000).map(|i| (i % 3 != 0).then_some(i)),
            )) as ArrayRef,
        ),
        (
            "s",
            Arc::new(StringArray::from_iter_values(
                (0..3000).map(|i| format!("v{i}")),
            )) as ArrayRef,
        ),
    ])
    .expect("batch");
    let seeds = [
        call_messages(
            &pool,
            "a",
            encoder
                .encode(&Array2::from_elem((300, 40), 1.5f64))
                .expect("array"),
        ),
        call_messages(
            &pool,
            "f",
            encoder.encode(&ColumnFrame(batch)).expect("frame"),
        ),
        call_messages(
            &pool,
            "s",
            encoder
                .encode(&Serde(vec![7u8; (1 << 20) + 4096]))
                .expect("serde"),
        ),
    ];
    for seed in &seeds {
        assert!(seed.len() >= 2, "a seed has a head and data");
        receive_call(&pool, seed.clone(), u64::MAX).expect("the unmutated call is received");
    }
    let mut rng = 0x5851_f42d_4c95_7f2du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..rounds() {
        let mut messages = seeds[round % seeds.len()].clone();
        match next() % 6 {
            // Flip bytes of one field of one message.
            0..=2 => {
                let at = (next() % messages.len() as u64) as usize;
                let message = &mut messages[at];
                let field = match next() % 3 {
                    0 => &mut message.app_metadata,
                    1 => &mut message.data_header,
                    _ => &mut message.data_body,
                };
                if !field.is_empty() {
                    let mut bytes = field.to_vec();
                    for _ in 0..1 + next() % 3 {
                        let i = (next() % bytes.len() as u64) as usize;
                        bytes[i] = next() as u8;
                    }
                    *field = Bytes::from(bytes);
                }
            }
            // Cut the stream short, or a body.
            3 => {
                let keep = 1 + (next() % messages.len() as u64) as usize;
                messages.truncate(keep);
                if let Some(last) = messages.last_mut() {
                    let cut = (next() % (last.data_body.len() as u64 + 1)) as usize;
                    last.data_body.truncate(cut);
                }
            }
            // Duplicate a message.
            4 => {
                let at = (next() % messages.len() as u64) as usize;
                let copy = messages[at].clone();
                messages.insert(at, copy);
            }
            // Swap two messages.
            _ => {
                let a = (next() % messages.len() as u64) as usize;
                let b = (next() % messages.len() as u64) as usize;
                messages.swap(a, b);
            }
        }
        // A limit some declared sizes pass and some do not.
        match receive_call(&pool, messages, 8 << 20) {
            Ok(()) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused > 0,
        "no mutation was refused: the test does not mutate"
    );
    eprintln!("{accepted} mutated calls received, {refused} refused");
    assert_eq!(
        pool.stats().live_blocks,
        0,
        "blocks left behind by refused calls"
    );
}

/// A batch with a dictionary column and nulls, large enough to travel as several batches.
fn interop_batch(rows: usize) -> RecordBatch {
    let keys = Int32Array::from_iter_values((0..rows).map(|i| (i % 4) as i32));
    let values = StringArray::from(vec!["north", "south", "east", "west"]);
    let dictionary = arrow::array::DictionaryArray::<arrow::datatypes::Int32Type>::try_new(
        keys,
        Arc::new(values),
    )
    .expect("dictionary");
    RecordBatch::try_from_iter([
        (
            "x",
            Arc::new(Float64Array::from_iter_values((0..rows).map(|i| i as f64))) as ArrayRef,
        ),
        (
            "n",
            Arc::new(Int32Array::from_iter(
                (0..rows).map(|i| (i % 3 != 0).then_some(i as i32)),
            )) as ArrayRef,
        ),
        (
            "s",
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("row {i}")),
            )) as ArrayRef,
        ),
        ("d", Arc::new(dictionary) as ArrayRef),
    ])
    .expect("batch")
}

#[test]
fn a_standard_flight_decoder_reads_the_frames_shm_sends() {
    let pool = ShmPool::new().expect("pool");
    let batch = interop_batch(400_000);
    let payload = Encoder::new(pool.clone())
        .encode(&ColumnFrame(batch.clone()))
        .expect("frame");
    let messages = call_messages(&pool, "m", payload);
    assert!(
        messages.len() > 3,
        "a frame this large travels as several batches"
    );
    // arrow-flight's own decoder, as any Flight client would use it.
    let stream = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
        futures::stream::iter(messages.into_iter().map(Ok)),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let batches: Vec<RecordBatch> = runtime
        .block_on(futures::TryStreamExt::try_collect(stream))
        .expect("a standard decoder reads the stream");
    let read = arrow::compute::concat_batches(&batch.schema(), &batches).expect("concat");
    assert_eq!(read, batch);
}

#[test]
fn shm_receives_frames_from_a_standard_flight_encoder() {
    let pool = ShmPool::new().expect("pool");
    let batch = interop_batch(50_000);
    // The head shm expects, then what arrow-flight's own encoder writes for two batches.
    let encoder = Encoder::new(pool.clone());
    let head = call_messages(
        &pool,
        "m",
        encoder.encode(&ColumnFrame(batch.clone())).expect("frame"),
    )
    .remove(0);
    let standard = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_dictionary_handling(arrow_flight::encode::DictionaryHandling::Resend)
        .build(futures::stream::iter([
            Ok(batch.slice(0, 20_000)),
            Ok(batch.slice(20_000, 30_000)),
        ]));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let data: Vec<_> = runtime
        .block_on(futures::TryStreamExt::try_collect(standard))
        .expect("the standard encoder");
    let messages: Vec<_> = std::iter::once(head).chain(data).collect();
    let received = shm_flight::fuzzing::receive_frame(&pool, messages).expect("received");
    assert_eq!(received, batch);
}

#[test]
fn a_flat_frame_of_many_batches_is_assembled_exactly() {
    let pool = ShmPool::new().expect("pool");
    let rows = 400_003; // the last batch is not a multiple of 8 rows
    let base = interop_batch(rows);
    let flags = arrow::array::BooleanArray::from_iter(
        (0..rows).map(|i| (i % 5 != 1).then_some(i % 3 == 0)),
    );
    let wide = arrow::array::LargeStringArray::from_iter(
        (0..rows).map(|i| (i % 11 != 0).then(|| "x".repeat(i % 7))),
    );
    let schema = base.schema();
    let mut columns: Vec<(&str, ArrayRef)> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .zip(base.columns().iter().cloned())
        .collect();
    columns.push(("flags", Arc::new(flags)));
    columns.push(("wide", Arc::new(wide)));
    let batch = RecordBatch::try_from_iter(columns).expect("batch");
    // Sent from a slice, so that offsets and bitmaps start mid-buffer.
    let batch = batch.slice(3, rows - 3);
    let payload = Encoder::new(pool.clone())
        .encode(&ColumnFrame(batch.clone()))
        .expect("frame");
    let messages = call_messages(&pool, "m", payload);
    assert!(messages.len() > 5, "the frame travels as several batches");
    let received = shm_flight::fuzzing::receive_frame(&pool, messages).expect("received");
    assert_eq!(received, batch);
}
