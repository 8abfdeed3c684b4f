//! Loading must not hold the model twice: tensors are converted from the memory-mapped file one
//! at a time, handed to burn and dropped. This binary counts every heap byte (its own global
//! allocator; it holds this one test so nothing else allocates meanwhile) and checks the peak
//! of a load against the f32 model plus a few of its largest tensors. Reading every tensor into
//! host memory before building (what loading used to do) peaks at about twice the model and fails.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sobre_model::{ModelConfig, default_device, init_model, load_model, save_model};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::SeqCst)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::SeqCst);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn loading_peaks_near_one_copy_of_the_model() {
    // Many equal layers, so the model is much larger than its largest tensor.
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.num_hidden_layers = 12;
    cfg.hidden_size = 64;
    cfg.vocab_size = 128;
    cfg.head_dim = 16;
    cfg.moe_intermediate_size = 32;
    let device = default_device();
    let dir = tempfile::tempdir().unwrap();
    {
        let m = init_model(&cfg, 1, &device);
        save_model(&m, &dir.path().join("m"), None).unwrap();
    }
    let model_bytes = cfg.num_parameters() * 4;
    // The largest tensor: a layer's stacked experts [E, H, 2·I] (or the embedding).
    let e = cfg.num_experts * cfg.hidden_size * 2 * cfg.moe_intermediate_size * 4;
    let largest = e.max(cfg.vocab_size * cfg.hidden_size * 4);
    assert!(
        model_bytes > 10 * largest,
        "the test needs a model ≫ its largest tensor"
    );

    // Warm up once (burn's and rayon's lazily-built statics), then measure a second load.
    drop(load_model(&dir.path().join("m"), &device).unwrap());
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let m = load_model(&dir.path().join("m"), &device).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - base;
    let kept = LIVE.load(Ordering::SeqCst) - base;
    drop(m);
    eprintln!(
        "model {model_bytes} B, largest tensor {largest} B, load peak {peak} B, kept {kept} B"
    );
    // What the loaded model holds is about the model itself.
    assert!(
        kept >= model_bytes && kept < model_bytes + model_bytes / 4,
        "kept {kept}"
    );
    // Peak: the model plus a few tensors in flight (a layer's experts being stacked and handed
    // to burn) — far below the 2× that reading everything first costs.
    assert!(
        peak < model_bytes + 4 * largest,
        "load peaked at {peak} B for a {model_bytes} B model (largest tensor {largest} B)"
    );
}
