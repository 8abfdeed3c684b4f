//! Choosing the backend by name: what the default build has, and what it says about the rest.

use sobre_model::{available_devices, default_device, device_by_name, use_device};

#[test]
fn device_names_and_the_process_wide_choice() {
    assert_eq!(
        device_by_name("cpu").unwrap(),
        burn::prelude::Device::flex()
    );
    assert_eq!(
        device_by_name("flex").unwrap(),
        burn::prelude::Device::flex()
    );
    assert!(available_devices().contains(&"cpu"));
    if !cfg!(feature = "tch") {
        let e = device_by_name("tch").unwrap_err().to_string();
        assert_eq!(
            e,
            "device `tch` needs sobre built with the cargo feature `tch` (not in the default \
             build); this build has: cpu"
        );
        assert!(device_by_name("tch-cuda:1").is_err());
    }
    if !cfg!(feature = "cuda") {
        let e = device_by_name("cuda:0").unwrap_err().to_string();
        assert!(e.contains("cargo feature `cuda`"), "{e}");
    }
    let e = device_by_name("cuda:x").unwrap_err().to_string();
    assert_eq!(e, "`cuda:x`: the device index `x` is not a number");
    let e = device_by_name("cpu:1").unwrap_err().to_string();
    assert_eq!(
        e,
        "`cpu:1`: only tch-cuda and cuda take a device index (`cuda:1`)"
    );
    let e = device_by_name("gpu").unwrap_err().to_string();
    assert!(
        e.starts_with("unknown device `gpu`; this build has: cpu"),
        "{e}"
    );

    // The choice is made once per process: the same device again is fine, another is refused.
    assert_eq!(default_device(), burn::prelude::Device::flex());
    use_device(burn::prelude::Device::flex()).unwrap();
    use_device(device_by_name("cpu").unwrap()).unwrap();
    assert_eq!(default_device(), burn::prelude::Device::flex());
    let other = burn::prelude::Device::flex().autodiff();
    if other != burn::prelude::Device::flex() {
        let e = use_device(other).unwrap_err().to_string();
        assert!(e.contains("chosen once per process"), "{e}");
    }
}
