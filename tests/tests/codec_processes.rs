//! shm-codec across real processes: arrays in every layout decoded by another process, and
//! arrays another process produced decoded here.

use ndarray::{Array2, Array3, Ix2, s};
use shm_codec::{Decoder, Encoder, Order, Payload, ShmArray};
use shm_core::ShmPool;
use shm_tests::{ChildProcess, CleanShm, from_hex, to_hex, weighted_sum};

const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

fn child_reads(payload: &Payload) -> String {
    let mut child = ChildProcess::spawn(CHILD, &["array", &to_hex(&payload.to_bytes())]);
    let line = child.read_line();
    child.finish();
    line
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
fn a_child_reads_a_slice_of_an_array_it_sent_back_without_a_copy() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let mut maker = ChildProcess::spawn(CHILD, &["make-array", "500", "300"]);
    let payload = Payload::from_bytes(&from_hex(&maker.read_line()).unwrap()).unwrap();
    let received: ShmArray<f64, Ix2> = Decoder::new(pool.clone()).decode(&payload).unwrap();
    assert_eq!(received.shape(), &[500, 300]);
    assert_eq!(
        received.order(),
        Order::F,
        "the child sent an F-ordered array"
    );
    let expected = Array2::from_shape_fn((500, 300), |(i, j)| (i * 7 + j) as f64);
    assert_eq!(received.view(), expected.view());

    // Re-send a slice of it to a third process: a reference into the maker's segment.
    let slice = received.slice(s![100..;-5, 10..20]);
    let resent = Encoder::new(pool.clone()).encode(&slice).unwrap();
    assert_eq!(resent.buffers()[0].name, payload.buffers()[0].name);
    let expected = format!("{:?} {}", slice.shape(), weighted_sum(slice.view().iter()));
    assert_eq!(child_reads(&resent), expected);

    drop((received, slice, resent));
    maker.finish();
    drop(pool);
    clean.end();
}
