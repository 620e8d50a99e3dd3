//! Arrays, frames and serde values through payloads: round trips, the reference design's
//! failures, and bad input.

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{
    Array, Array0, Array1, Array2, Array3, ArrayD, Axis, Ix1, Ix2, Ix3, IxDyn, SliceInfoElem, s,
};
use proptest::prelude::*;
use shm_codec::{
    CodecError, Complex, Decoder, Encoder, Index, Order, Payload, Registry, Serde, SerdeCodec,
    ShmArray, ShmArrayMut, SimpleFrame, array_order,
};
use shm_core::{PoolConfig, ShmPool};

fn pool() -> ShmPool {
    ShmPool::new().unwrap()
}

fn codecs() -> (Encoder, Decoder) {
    (Encoder::new(pool()), Decoder::new(pool()))
}

/// Encodes, sends as bytes, decodes: the path between two processes.
fn round_trip<T: shm_codec::Element, D: ndarray::Dimension>(
    (encoder, decoder): &(Encoder, Decoder),
    a: &impl shm_codec::Encode,
) -> ShmArray<T, D> {
    let payload = encoder.encode(a).unwrap();
    let received = Payload::from_bytes(&payload.to_bytes()).unwrap();
    decoder.decode(&received).unwrap()
}

#[test]
fn every_element_type_round_trips() {
    let c = codecs();
    macro_rules! check {
        ($($t:ty => $f:expr),*) => {$(
            let a = Array2::<$t>::from_shape_fn((70, 130), |(i, j)| $f(i * 130 + j));
            let b: ShmArray<$t, Ix2> = round_trip(&c, &a);
            assert_eq!(b.view(), a.view(), "{}", stringify!($t));
        )*};
    }
    check!(
        bool => |k: usize| k.is_multiple_of(3),
        i8 => |k: usize| k as i8, i16 => |k: usize| k as i16, i32 => |k: usize| -(k as i32),
        i64 => |k: usize| k as i64 * -7, u8 => |k: usize| k as u8, u16 => |k: usize| k as u16,
        u32 => |k: usize| k as u32, u64 => |k: usize| k as u64 * 3, f32 => |k: usize| k as f32 / 3.0,
        f64 => |k: usize| k as f64 / 7.0,
        Complex<f32> => |k: usize| Complex::new(k as f32, -(k as f32)),
        Complex<f64> => |k: usize| Complex::new(k as f64, 0.5)
    );
}

#[test]
fn fortran_order_comes_back_as_the_same_fortran_array() {
    // Reference failure 1: an F array was written C-order and recorded as F.
    let c = codecs();
    let a = Array2::from_shape_fn((300, 200), |(i, j)| (i * 1000 + j) as f64).reversed_axes();
    assert_eq!(array_order(&a), Order::F);
    let b: ShmArray<f64, Ix2> = round_trip(&c, &a);
    assert_eq!(b.view(), a.view());
    assert_eq!(b.order(), Order::F);
    assert_eq!(b.view()[[3, 17]], a[[3, 17]]);
}

#[test]
fn non_contiguous_arrays_are_copied_into_c_order() {
    // Reference failure 2: a non-contiguous array made decoding fail.
    let c = codecs();
    let base = Array3::from_shape_fn((40, 50, 60), |(i, j, k)| (i * 10_000 + j * 100 + k) as i64);
    let stepped = base.slice(s![..;3, 5..;2, ..;-4]);
    let permuted = base.view().permuted_axes([2, 0, 1]);
    for view in [stepped, permuted] {
        assert_eq!(array_order(&view), Order::NonContiguous);
        let b: ShmArray<i64, Ix3> = round_trip(&c, &view);
        assert_eq!(b.view(), view);
        assert_eq!(b.order(), Order::C);
    }
    let reversed = Array1::from_iter(0..100_000u32);
    let reversed = reversed.slice(s![..;-1]);
    let b: ShmArray<u32, Ix1> = round_trip(&c, &reversed);
    assert_eq!(b.view(), reversed);
}

#[test]
fn zero_size_and_zero_dimensional_arrays_work() {
    // Reference failure 4: a zero-size array raised an error.
    let c = codecs();
    for shape in [vec![0], vec![0, 5], vec![7, 0, 3], vec![]] {
        let a = ArrayD::<f64>::zeros(IxDyn(&shape));
        let b: ShmArray<f64, IxDyn> = round_trip(&c, &a);
        assert_eq!(b.shape(), &shape[..]);
        assert_eq!(b.view(), a.view());
    }
    let scalar = Array0::from_elem((), 42.5f64);
    let b: ShmArray<f64, ndarray::Ix0> = round_trip(&c, &scalar);
    assert_eq!(b.view()[()], 42.5);
}

#[test]
fn slices_of_decoded_arrays_are_resent_without_a_copy() {
    // Reference failure 3: slices lost their link to shared memory.
    let c = codecs();
    let a = Array2::from_shape_fn((2000, 100), |(i, j)| (i * 100 + j) as f64);
    let payload = c.0.encode(&a).unwrap();
    let b: ShmArray<f64, Ix2> = c.1.decode(&payload).unwrap();
    let created = c.0.pool().stats().segments_created;

    let slice = b.slice(s![10..1500;-3, 7..90;2]);
    let plain_view = b.view().slice_move(s![.., 50]);
    for (resent, expected) in [
        (
            c.0.encode(&slice).unwrap(),
            slice.view().into_dyn().to_owned(),
        ),
        (
            c.0.encode(&plain_view).unwrap(),
            plain_view.into_dyn().to_owned(),
        ),
    ] {
        assert_eq!(resent.buffers().len(), 1);
        assert_eq!(
            resent.buffers()[0].name,
            payload.buffers()[0].name,
            "sent by reference"
        );
        assert!(resent.inline.is_empty());
        let again: ShmArray<f64, IxDyn> = c.1.decode(&resent).unwrap();
        assert_eq!(again.view(), expected.view());
        assert_eq!(
            again.block().unwrap().as_ptr(),
            b.block().unwrap().as_ptr(),
            "the receiver reads the very same mapping"
        );
    }
    assert_eq!(
        c.0.pool().stats().segments_created,
        created,
        "no new segment"
    );
}

#[test]
fn arrays_produced_in_place_are_sent_without_a_copy() {
    let c = codecs();
    let mut producing = ShmArrayMut::<f32, Ix2>::zeros(c.0.pool(), (500, 400)).unwrap();
    producing
        .view_mut()
        .indexed_iter_mut()
        .for_each(|((i, j), v)| *v = (i + j) as f32);
    let frozen = producing.freeze();
    let payload = c.0.encode(&frozen).unwrap();
    assert_eq!(payload.buffers()[0].name, frozen.block().unwrap().name());
    let b: ShmArray<f32, Ix2> = c.1.decode(&payload).unwrap();
    assert_eq!(b.view()[[499, 399]], 898.0);
    assert_eq!(b.view(), frozen.view());
}

#[test]
fn decoded_arrays_are_read_only_views_of_the_senders_memory() {
    // Reference failure 11: decoded arrays were writable views of memory the other side owned.
    let c = codecs();
    let a = Array1::from_iter(0..1_000_000i32);
    let b: ShmArray<i32, Ix1> = round_trip(&c, &a);
    // A decoded array's block is a `ShmBlock`, which has no way to write (only a
    // `ShmBlockMut`, which has no reference to send, has one).
    let _read_only: &Arc<shm_core::ShmBlock> = b.block().unwrap();
    let mut owned = b.to_owned();
    owned[0] = 5;
    assert_eq!(b.view()[0], 0, "changing a copy leaves shared memory alone");
}

#[test]
fn small_arrays_travel_inline_and_large_ones_in_a_block() {
    let c = codecs();
    let small = Array1::from_elem(100, 1.0f64);
    let payload = c.0.encode(&small).unwrap();
    assert!(payload.buffers().is_empty());
    assert_eq!(payload.inline.len(), 800);
    let large = Array1::from_elem(100_000, 1.0f64);
    let payload = c.0.encode(&large).unwrap();
    assert_eq!(payload.buffers().len(), 1);
    assert!(payload.inline.is_empty());
    assert_eq!(
        payload.blocks().len(),
        1,
        "the payload keeps its block alive"
    );
}

#[test]
fn arrays_from_blocks_check_their_size() {
    let pool = pool();
    let mut block = pool.alloc(8 * 12).unwrap();
    block.as_mut_slice().fill(0);
    let block = block.freeze();
    let a = ShmArray::<f64, Ix2>::from_block(Arc::clone(&block), (3, 4), Order::F).unwrap();
    assert_eq!(a.order(), Order::F);
    assert!(matches!(
        ShmArray::<f64, Ix2>::from_block(Arc::clone(&block), (3, 5), Order::C),
        Err(CodecError::Layout { .. })
    ));
    assert!(matches!(
        ShmArray::<f64, Ix2>::from_block(block, (3, 4), Order::NonContiguous),
        Err(CodecError::Layout { .. })
    ));
}

#[test]
fn simple_frames_keep_columns_duplicates_and_index() {
    let c = codecs();
    let x: Vec<f64> = (0..50_000).map(f64::from).collect();
    let y: Vec<f64> = x.iter().map(|v| v * 2.0).collect();
    let frame = SimpleFrame::from_columns(
        c.0.pool(),
        &[("x", &x), ("y", &y), ("x", &y)],
        Index::Range { start: 10, step: 2 },
    )
    .unwrap();
    let payload = c.0.encode(&frame).unwrap();
    let back: SimpleFrame<f64> =
        c.1.decode(&Payload::from_bytes(&payload.to_bytes()).unwrap())
            .unwrap();
    assert_eq!(back.columns(), ["x", "y", "x"]);
    assert_eq!(back.index(), &Index::Range { start: 10, step: 2 });
    assert_eq!(back.column("y").unwrap().to_vec(), y);
    assert_eq!(
        back.column("x").unwrap().to_vec(),
        x,
        "the first of duplicate names"
    );
    assert_eq!(back.column_at(2).unwrap().to_vec(), y);
    assert!(
        back.column_at(2).unwrap().as_slice().is_some(),
        "columns are contiguous"
    );

    let empty = SimpleFrame::<f64>::from_columns(
        c.0.pool(),
        &[("a", &[]), ("b", &[])],
        Index::Labels(vec![]),
    )
    .unwrap();
    let back: SimpleFrame<f64> = c.1.decode(&c.0.encode(&empty).unwrap()).unwrap();
    assert_eq!(
        (back.nrows(), back.columns()),
        (0, &["a".to_owned(), "b".to_owned()][..])
    );
}

#[test]
fn serde_values_travel_inline_or_in_a_block_of_their_own() {
    let c = codecs();
    let small: BTreeMap<String, Vec<i32>> = [("a".into(), vec![1, 2]), ("b".into(), vec![])].into();
    let payload = c.0.encode(&Serde(&small)).unwrap();
    assert!(payload.buffers().is_empty());
    let Serde(back): Serde<BTreeMap<String, Vec<i32>>> = c.1.decode(&payload).unwrap();
    assert_eq!(back, small);

    let large = "x".repeat(3 << 20);
    let payload = c.0.encode(&Serde(&large)).unwrap();
    assert_eq!(payload.buffers().len(), 1);
    assert!(payload.is_backed(), "the payload holds the block it names");
    let Serde(back): Serde<String> = c.1.decode(&payload).unwrap();
    assert_eq!(back, large);
}

#[test]
fn large_serde_values_in_one_tuple_keep_their_own_blocks() {
    // A pool that keeps no idle segment: a block nobody holds is unlinked at once.
    for cache_bytes in [2 << 30, 0] {
        let pool =
            ShmPool::with_config(PoolConfig::default().with_cache_bytes(cache_bytes)).unwrap();
        let encoder = Encoder::new(pool.clone());
        let payload = encoder
            .encode(&(Serde(vec![1u8; 2 << 20]), Serde(vec![2u8; 2 << 20])))
            .unwrap();
        assert_eq!(payload.blocks().len(), 2, "the tuple holds both blocks");
        let (Serde(a), Serde(b)): (Serde<Vec<u8>>, Serde<Vec<u8>>) =
            Decoder::new(pool).decode(&payload).unwrap();
        assert!(a.iter().all(|&x| x == 1), "the first value was overwritten");
        assert!(b.iter().all(|&x| x == 2));
    }
}

#[test]
fn the_registry_dispatches_by_type_and_by_name() {
    let c = codecs();
    let mut registry = Registry::new();
    registry.register(SerdeCodec::<Vec<String>>::new("labels"));
    let payload = registry.encode(&vec!["a".to_owned()], &c.0).unwrap();
    assert_eq!(payload.codec, "labels");
    let labels: Vec<String> = registry.decode_as(&payload, &c.1).unwrap();
    assert_eq!(labels, ["a"]);

    let a = Array2::from_elem((300, 300), 2i16);
    let payload = registry.encode(&a, &c.0).unwrap();
    let b: ShmArray<i16, IxDyn> = registry.decode_as(&payload, &c.1).unwrap();
    assert_eq!(b.shape(), &[300, 300]);
    assert!(matches!(
        registry.decode_as::<ShmArray<f64, IxDyn>>(&payload, &c.1),
        Err(CodecError::WrongType { .. })
    ));

    assert!(matches!(
        registry.encode(&1u8, &c.0),
        Err(CodecError::NoCodec { .. })
    ));
    let unknown = Payload::new("parquet", Vec::new(), Vec::new(), Vec::new());
    match registry.decode(&unknown, &c.1) {
        Err(CodecError::UnknownCodec { name, known }) => {
            assert_eq!(name, "parquet");
            assert!(known.contains(&"labels".to_owned()));
        }
        other => panic!("expected UnknownCodec, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn typed_decoding_refuses_the_wrong_dtype_and_dimensions() {
    let c = codecs();
    let payload = c.0.encode(&Array2::<f64>::zeros((10, 10))).unwrap();
    assert!(matches!(
        c.1.decode::<ShmArray<f32, Ix2>>(&payload),
        Err(CodecError::WrongDtype { .. })
    ));
    assert!(matches!(
        c.1.decode::<ShmArray<f64, Ix3>>(&payload),
        Err(CodecError::WrongDimensions {
            expected: 3,
            found: 2
        })
    ));
    assert!(matches!(
        c.1.decode::<Serde<u8>>(&payload),
        Err(CodecError::WrongCodec { .. })
    ));
}

#[test]
fn bool_arrays_with_bytes_other_than_0_and_1_are_refused() {
    let c = codecs();
    let payload = c.0.encode(&Array1::<u8>::from_elem(100, 1)).unwrap();
    let mut bytes = payload.clone();
    let mut meta: wire::Meta = postcard::from_bytes(&bytes.meta).unwrap();
    meta.typestr = "|b1".into();
    bytes.meta = postcard::to_stdvec(&meta).unwrap();
    bytes.inline[37] = 2;
    assert!(matches!(
        c.1.decode::<ShmArray<bool, Ix1>>(&bytes),
        Err(CodecError::InvalidBool {
            index: 37,
            value: 2
        })
    ));
    bytes.inline[37] = 0;
    let ok: ShmArray<bool, Ix1> = c.1.decode(&bytes).unwrap();
    assert!(!ok.view()[37] && ok.view()[36]);
}

/// The array metadata as another implementation would write it (docs/format.md).
mod wire {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Meta {
        pub typestr: String,
        pub shape: Vec<u64>,
        pub strides: Vec<i64>,
        pub origin: u64,
    }
}

#[test]
fn lying_metadata_is_a_typed_error() {
    let c = codecs();
    let payload = c.0.encode(&Array2::<f64>::zeros((100, 100))).unwrap();
    let base: wire::Meta = postcard::from_bytes(&payload.meta).unwrap();
    let with = |f: &dyn Fn(&mut wire::Meta)| {
        let mut meta: wire::Meta = postcard::from_bytes(&payload.meta).unwrap();
        f(&mut meta);
        let mut bad = payload.clone();
        bad.meta = postcard::to_stdvec(&meta).unwrap();
        bad
    };
    let cases: Vec<(&str, Payload)> = vec![
        ("bigger shape", with(&|m| m.shape = vec![101, 100])),
        (
            "overflowing shape",
            with(&|m| m.shape = vec![u64::MAX / 2, 4]),
        ),
        ("stride past the end", with(&|m| m.strides = vec![8000, 16])),
        ("odd stride", with(&|m| m.strides = vec![801, 8])),
        ("negative reach", with(&|m| m.strides = vec![-800, 8])),
        ("misaligned origin", with(&|m| m.origin = 4)),
        ("origin past the end", with(&|m| m.origin = 80_000)),
        ("unknown dtype", with(&|m| m.typestr = "<f16".into())),
        ("strides of another rank", with(&|m| m.strides = vec![8])),
        (
            "an empty axis beside a huge one",
            with(&|m| m.shape = vec![0, 1 << 62]),
        ),
        (
            "zero strides: 8 bytes as 2^40 elements",
            with(&|m| {
                m.shape = vec![1 << 20, 1 << 20];
                m.strides = vec![0, 0];
            }),
        ),
        (
            "overlapping strides",
            with(&|m| {
                m.shape = vec![10_000, 100];
                m.strides = vec![8, 8];
            }),
        ),
    ];
    assert_eq!(base.shape, vec![100, 100]);
    for (what, bad) in cases {
        let result = c.1.decode::<ShmArray<f64, IxDyn>>(&bad);
        assert!(result.is_err(), "{what}: accepted");
    }
    let two_buffers = Payload::from_refs(
        shm_codec::ARRAY_CODEC,
        payload.meta.clone(),
        vec![payload.buffers()[0].clone(); 2],
        Vec::new(),
    );
    assert!(matches!(
        c.1.decode::<ShmArray<f64, IxDyn>>(&two_buffers),
        Err(CodecError::BufferCount {
            expected: 1,
            found: 2,
            ..
        })
    ));
}

#[test]
fn strides_of_axes_that_never_step_are_ignored_even_when_extreme() {
    let c = codecs();
    let a = Array2::from_shape_fn((1, 9000), |(_, j)| j as f64);
    let payload = c.0.encode(&a).unwrap();
    let mut meta: wire::Meta = postcard::from_bytes(&payload.meta).unwrap();
    for stride in [i64::MIN, i64::MAX, 0, -8] {
        meta.strides[0] = stride;
        let mut odd = payload.clone();
        odd.meta = postcard::to_stdvec(&meta).unwrap();
        let back: ShmArray<f64, IxDyn> = c.1.decode(&odd).unwrap();
        assert_eq!(back.view(), a.view().into_dyn(), "stride {stride}");
        assert_eq!(back.to_owned(), a.clone().into_dyn());
    }
}

#[test]
fn a_broadcast_view_is_copied_rather_than_sent_as_aliasing_strides() {
    let c = codecs();
    let base = ShmArrayMut::<f64, ndarray::Ix1>::zeros(c.0.pool(), 10_000)
        .unwrap()
        .freeze();
    let row = base.view();
    let broadcast = row.broadcast((50, 10_000)).unwrap();
    let payload = c.0.encode(&broadcast).unwrap();
    assert_ne!(
        payload.buffers()[0].name,
        base.block().unwrap().name(),
        "a broadcast view went out as a reference to its block"
    );
    let back: ShmArray<f64, IxDyn> = c.1.decode(&payload).unwrap();
    assert_eq!(back.view(), broadcast.into_dyn());
}

#[test]
fn thousands_of_mutated_payloads_give_values_or_errors() {
    let c = codecs();
    let payloads = [
        c.0.encode(&Array2::from_shape_fn((20, 30), |(i, j)| (i + j) as f64))
            .unwrap(),
        c.0.encode(&Array3::from_shape_fn((50, 40, 30), |(i, j, k)| {
            (i ^ j ^ k) as u16
        }))
        .unwrap(),
        c.0.encode(&Array1::from_elem(10, true)).unwrap(),
    ];
    let mut mutations = shm_tests::Mutations::new(0x2545_f491_4f6c_dd1du64, 6000);
    let rounds = mutations.rounds;
    let mut next = move || mutations.draw();
    let mut decoded = 0;
    for round in 0..rounds {
        let mut bytes = payloads[round % payloads.len()].to_bytes();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, next() as u8),
            }
            if bytes.is_empty() {
                break;
            }
        }
        let Ok(payload) = Payload::from_bytes(&bytes) else {
            continue;
        };
        if let Ok(array) = c.1.decode::<ShmArray<f64, IxDyn>>(&payload) {
            decoded += array.view().iter().count().min(1);
        }
        let _ =
            c.1.decode::<ShmArray<u16, IxDyn>>(&payload)
                .map(|a| a.view().fold(0u16, |x, y| x.wrapping_add(*y)));
        let _ =
            c.1.decode::<ShmArray<bool, IxDyn>>(&payload)
                .map(|a| a.view().iter().filter(|b| **b).count());
        let _ = Registry::new().decode(&payload, &c.1);
    }
    assert!(
        decoded > 0,
        "no mutation left a payload decodable: the test mutates too much"
    );
}

fn any_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..6, 0..5)
}

/// Builds an array of `shape` (C or F order) from `element(i)`, steps and reverses its axes,
/// sends it, checks what arrives; then sends a slice of what arrived and checks that too.
fn check_layouts<T: shm_codec::Element + PartialEq>(
    shape: &[usize],
    fortran: bool,
    steps: &[(isize, bool)],
    element: impl Fn(usize) -> T,
) -> Result<(), TestCaseError> {
    let c = codecs();
    let n: usize = shape.iter().product();
    let a = Array::from_shape_vec(IxDyn(shape), (0..n).map(&element).collect()).unwrap();
    let a = if fortran { a.reversed_axes() } else { a };
    let mut view = a.view();
    for (axis, (step, reverse)) in steps.iter().enumerate().take(view.ndim()) {
        let step = if *reverse { -step } else { *step };
        view.slice_axis_inplace(Axis(axis), ndarray::Slice::new(0, None, step));
    }
    let b: ShmArray<T, IxDyn> = round_trip(&c, &view);
    prop_assert_eq!(b.view(), view.view());
    if array_order(&view) == Order::F {
        prop_assert_eq!(b.order(), Order::F);
    }
    let every_other: Vec<SliceInfoElem> = (0..b.shape().len())
        .map(|_| SliceInfoElem::Slice {
            start: 0,
            end: None,
            step: 2,
        })
        .collect();
    let half = b.slice(every_other.as_slice());
    let back: ShmArray<T, IxDyn> = round_trip(&c, &half);
    prop_assert_eq!(back.view(), half.view());
    Ok(())
}

proptest! {
    #[test]
    fn random_arrays_of_every_dtype_round_trip_in_any_layout(
        shape in any_shape(),
        fortran in any::<bool>(),
        steps in prop::collection::vec((1isize..3, any::<bool>()), 5),
        big in any::<bool>(),
        dtype in 0usize..6,
    ) {
        let mut shape = shape;
        if let (true, Some(first)) = (big, shape.first_mut()) {
            *first *= 3000;
        }
        match dtype {
            0 => check_layouts(&shape, fortran, &steps, |i| i as i64)?,
            1 => check_layouts(&shape, fortran, &steps, |i| i as f32 * 0.5)?,
            2 => check_layouts(&shape, fortran, &steps, |i| i as u8)?,
            3 => check_layouts(&shape, fortran, &steps, |i| i % 3 == 0)?,
            4 => check_layouts(&shape, fortran, &steps, |i| Complex::new(i as f64, -(i as f64)))?,
            _ => check_layouts(&shape, fortran, &steps, |i| i as i16)?,
        }
    }
}

#[test]
fn a_contiguous_array_left_unwritten_is_its_encoding_and_lends_its_own_memory() {
    let (encoder, decoder) = codecs();
    let c = Array2::<f64>::from_shape_fn((300, 200), |(i, j)| (i * 200 + j) as f64);
    let f = Array2::<f64>::from_shape_fn(ndarray::ShapeBuilder::f((300, 200)), |(i, j)| {
        (i * 200 + j) as f64
    });
    assert_eq!(array_order(&f), Order::F);
    for a in [&c, &f] {
        let unwritten = encoder
            .encode_unwritten(a)
            .unwrap()
            .expect("a contiguous array on the heap can be left unwritten");
        let encoded = encoder.encode(a).unwrap();
        assert_eq!(
            (&unwritten.codec, &unwritten.meta, &unwritten.inline),
            (&encoded.codec, &encoded.meta, &encoded.inline)
        );
        let [shm_codec::Source::Pieces(pieces)] = &unwritten.sources[..] else {
            panic!("one block of pieces: {:?}", unwritten.sources);
        };
        let [(piece, 0)] = pieces.iter().collect::<Vec<_>>()[..] else {
            panic!("one piece at 0");
        };
        assert_eq!(piece.len(), encoded.blocks()[0].len());
        assert_eq!(
            piece.as_ptr(),
            a.as_slice_memory_order().unwrap().as_ptr().cast::<u8>(),
            "the piece is the array's own memory, not a copy"
        );
        let back: ShmArray<f64, Ix2> = decoder
            .decode(&unwritten.clone().write(&encoder).unwrap())
            .unwrap();
        assert_eq!(back.view(), a.view());
        assert_eq!(array_order(&back.view()), array_order(a));
    }

    // Encoded as usual: an array that is not contiguous, a small one, one already in shared
    // memory.
    let strided = c.slice(s![..;2, ..]);
    assert!(encoder.encode_unwritten(&strided).unwrap().is_none());
    let small = Array1::<f64>::zeros(4);
    assert!(encoder.encode_unwritten(&small).unwrap().is_none());
    let shared: ShmArray<f64, Ix2> = decoder.decode(&encoder.encode(&c).unwrap()).unwrap();
    assert!(encoder.encode_unwritten(&shared.view()).unwrap().is_none());
}
