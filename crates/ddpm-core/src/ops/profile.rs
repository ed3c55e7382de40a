//! Where a training step's time goes, by kind of op: `ddpm bench --profile` switches this on, runs a
//! few steps and prints the milliseconds per step of each kind (the convolutions' forward and
//! backward, group norm, attention, dropout, the loss, the optimizer, the EMA); what no kind claims
//! (candle's own ops: the time embedding, concatenations, upsampling, casts, the gradients' sums) is
//! the step's time less their total.
//!
//! Each op that has a kind opens a [`span`] around its work. On CUDA a span records a timing event
//! on the device's stream where it opens and another where it closes, so its time is the GPU's, from
//! the first of its kernels to the last (and the GPU's idle time between them, if the host issued
//! them slower than they ran); on the CPU, where ops run as they are called, it is the wall-clock
//! time. Spans nest, and time goes to the outermost one (attention's softmax counts as attention).
//! Metal has no timing here: its spans record nothing. Off (the default), a span is a load of one
//! flag.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Result};

/// Whether spans record.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Switches recording on or off (for every thread).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans record ([`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How a span's time is taken.
enum Start {
    /// Wall clock, for the CPU.
    Cpu(Instant),
    /// An event recorded on the stream, for CUDA.
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent, std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>),
}

/// A closed span's time, read by [`report`].
enum Elapsed {
    /// Milliseconds, already known.
    Ms(f64),
    /// The events around the span's work on the GPU.
    #[cfg(feature = "cuda")]
    Events(candle_core::cuda_backend::cudarc::driver::CudaEvent, candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Elapsed {
    /// The time in milliseconds (waiting for the GPU to pass the end event).
    fn ms(self) -> Result<f64> {
        match self {
            Elapsed::Ms(ms) => Ok(ms),
            #[cfg(feature = "cuda")]
            Elapsed::Events(begin, end) => Ok(f64::from(begin.elapsed_ms(&end).map_err(|e| candle_core::Error::Cuda(Box::new(e)))?)),
        }
    }
}

thread_local! {
    /// Spans open on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Closed outermost spans since the last [`report`]: kind and time.
    static CLOSED: RefCell<Vec<(&'static str, Elapsed)>> = const { RefCell::new(Vec::new()) };
}

/// An open span of kind `name`; closing it (dropping it) records its time when it is the outermost
/// open span and recording is on.
#[must_use = "a span records the time until it is dropped"]
pub struct Span {
    /// Whether this span counts in [`DEPTH`] (recording was on when it opened).
    counted: bool,
    /// The kind and the start, for an outermost span on a device with timing.
    start: Option<(&'static str, Start)>,
}

/// Opens a span of kind `name` for work on `device` (see the module docs). Errors of the CUDA event
/// calls leave the span without a time rather than failing the op.
pub fn span(device: &Device, name: &'static str) -> Span {
    if !enabled() {
        return Span { counted: false, start: None };
    }
    let outermost = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    let start = if !outermost {
        None
    } else {
        match device {
            Device::Cpu => Some(Start::Cpu(Instant::now())),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let stream = d.cuda_stream();
                record(&stream).map(|e| Start::Cuda(e, stream))
            }
            _ => None,
        }
    };
    Span { counted: true, start: start.map(|s| (name, s)) }
}

/// A timing event recorded on `stream` now (`None` if the driver refuses).
#[cfg(feature = "cuda")]
fn record(stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> Option<candle_core::cuda_backend::cudarc::driver::CudaEvent> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let event = stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()?;
    event.record(stream).ok()?;
    Some(event)
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.counted {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
        let Some((name, start)) = self.start.take() else { return };
        let elapsed = match start {
            Start::Cpu(t) => Some(Elapsed::Ms(t.elapsed().as_secs_f64() * 1e3)),
            #[cfg(feature = "cuda")]
            Start::Cuda(begin, stream) => record(&stream).map(|end| Elapsed::Events(begin, end)),
        };
        if let Some(e) = elapsed {
            CLOSED.with(|c| c.borrow_mut().push((name, e)));
        }
    }
}

/// The time of each kind over the spans closed on this thread since the last call, in milliseconds,
/// with their count, by kind in order of first appearance; clears them. Waits for the GPU where the
/// spans' events are still to come.
pub fn report() -> Result<Vec<(&'static str, f64, usize)>> {
    let closed = CLOSED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let mut out: Vec<(&'static str, f64, usize)> = Vec::new();
    for (name, elapsed) in closed {
        let ms = elapsed.ms()?;
        match out.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => {
                entry.1 += ms;
                entry.2 += 1;
            }
            None => out.push((name, ms, 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_record_only_when_on_and_time_goes_to_the_outermost() {
        let cpu = Device::Cpu;
        set_enabled(false);
        drop(span(&cpu, "off"));
        set_enabled(true);
        {
            let _outer = span(&cpu, "outer");
            let _inner = span(&cpu, "inner");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(span(&cpu, "outer"));
        set_enabled(false);
        let r = report().unwrap();
        // "off" was never recorded, "inner" nested in "outer"; two closed "outer" spans
        assert_eq!(r.iter().map(|(n, _, c)| (*n, *c)).collect::<Vec<_>>(), [("outer", 2)]);
        assert!(r[0].1 >= 20.0, "{r:?}");
        assert!(report().unwrap().is_empty(), "a report clears what it read");
    }
}
