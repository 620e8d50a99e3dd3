//! shm-codec across real processes: arrays in every layout decoded by another process, and
//! arrays another process produced decoded here. Segments travel on a link, as descriptors.

use std::sync::Arc;

use ndarray::{Array2, Array3, Ix2, s};
use shm_codec::{Attacher, Decoder, Encoder, Order, Payload, ShmArray};
use shm_core::{SegmentLink, ShmBlock, ShmPool, ShmRef};
use shm_tests::{ChildProcess, CleanShm, from_hex, to_hex, weighted_sum};

const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

fn child_reads(payload: &Payload) -> String {
    let blocks: Vec<&ShmBlock> = payload.blocks().iter().map(|b| &**b).collect();
    let (mut child, _link) =
        ChildProcess::spawn_linked(CHILD, &["array", &to_hex(&payload.to_bytes())], &blocks);
    let line = child.read_line();
    child.finish();
    line
}

/// Resolves a payload's references on a link, as a transport does for its peer's blocks.
struct Linked(SegmentLink);

impl Attacher for Linked {
    fn attach(&self, _pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>> {
        self.0.attach(r).map(Arc::new)
    }
}

#[test]
fn a_child_decodes_arrays_in_every_layout() {
    let clean = CleanShm::begin();
    let encoder = Encoder::new(ShmPool::new().unwrap());
    let base = Array3::from_shape_fn((30, 40, 50), |(i, j, k)| (i * 2000 + j * 50 + k) as f64);
    let fortran = base.t().to_owned();
    let views = [
        base.view(),
        fortran.view(),
        base.slice(s![..;-2, 3..;3, ..;4]),
        base.view().permuted_axes([1, 2, 0]),
        base.slice(s![0..0, .., ..]),
    ];
    for view in views {
        let payload = encoder.encode(&view).unwrap();
        let expected = format!("{:?} {}", view.shape(), weighted_sum(view.iter()));
        assert_eq!(child_reads(&payload), expected);
    }
    drop(encoder);
    clean.end();
}

#[test]
fn an_array_a_child_made_is_viewed_in_place_and_a_slice_of_it_resent_by_reference() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let (mut maker, link) = ChildProcess::spawn_linked(CHILD, &["make-array", "500", "300"], &[]);
    let payload = Payload::from_bytes(&from_hex(&maker.read_line()).unwrap()).unwrap();
    let decoder = Decoder::with_attacher(pool.clone(), Arc::new(Linked(link)));
    let received: ShmArray<f64, Ix2> = decoder.decode(&payload).unwrap();
    assert_eq!(received.shape(), &[500, 300]);
    assert_eq!(
        received.order(),
        Order::F,
        "the child sent an F-ordered array"
    );
    let expected = Array2::from_shape_fn((500, 300), |(i, j)| (i * 7 + j) as f64);
    assert_eq!(received.view(), expected.view());

    // A slice of it is encoded as a reference into the maker's segment, without a copy. Only
    // the maker holds that segment's descriptor, so a third process gets it from the maker
    // (the transport copies such a block into one of its own before it sends it on).
    let slice = received.slice(s![100..;-5, 10..20]);
    let resent = Encoder::new(pool.clone()).encode(&slice).unwrap();
    assert_eq!(resent.buffers()[0].name, payload.buffers()[0].name);
    let copied = Encoder::new(pool.clone())
        .encode(&slice.view().to_owned())
        .unwrap();
    let expected = format!("{:?} {}", slice.shape(), weighted_sum(slice.view().iter()));
    assert_eq!(child_reads(&copied), expected);

    drop((received, slice, resent, copied, decoder));
    maker.finish();
    drop(pool);
    clean.end();
}
