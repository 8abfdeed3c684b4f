//! A secret in the trainer's environment is not visible to a sandboxed program: not through its
//! own environment, nor through `/proc/<pid>/environ` of its parent or of PID 1.
//!
//! Its own test binary: it sets an environment variable, which is only sound with no other
//! thread running.

use sobre_reward::sandbox::{Isolation, Limits, Sandbox, resolve_program};

#[test]
fn environment_secrets_do_not_leak() {
    let secret = format!("hunter2-{}", std::process::id());
    // SAFETY: the only test of this binary, run before any thread that could read the
    // environment is started.
    unsafe { std::env::set_var("SOBRE_TEST_SECRET", &secret) };
    let Some(python) = resolve_program("python3") else {
        eprintln!("skipped: python3 not found");
        return;
    };
    let code = format!(
        "import os\nfound = []\nif os.environ.get('SOBRE_TEST_SECRET'):\n    found.append('env')\n\
         for p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ', '/proc/self/environ']:\n    \
         try:\n        if b'{secret}' in open(p, 'rb').read():\n            found.append(p)\n    \
         except OSError:\n        pass\n\
         for d in os.listdir('/proc'):\n    \
         if d.isdigit():\n        try:\n            if b'{secret}' in open('/proc/%s/environ' % d, 'rb').read():\n                found.append(d)\n        \
         except OSError:\n            pass\n\
         print('leaked', found) if found else print('clean', sorted(os.environ))\n"
    );
    let sb = Sandbox::new(Limits::default(), Isolation::default()).unwrap();
    let argv = vec![python.display().to_string(), "main.py".to_string()];
    let out = sb.run(&argv, &[("main.py", code.as_bytes())], b"").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", out.stderr_tail(500));
    assert!(out.success(), "{out:?}");
    assert!(!stdout.contains(&secret), "{stdout}");
    // Python adds LC_CTYPE itself (PEP 538); nothing else is there.
    assert!(
        stdout.trim() == "clean ['PATH']" || stdout.trim() == "clean ['LC_CTYPE', 'PATH']",
        "{stdout}"
    );
}
