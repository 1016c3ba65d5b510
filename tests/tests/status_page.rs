//! The live status page in headless Chromium, driven over the DevTools
//! protocol: a new registration and a new connect appear without a reload,
//! the pictures are drawn, and a phone-sized screen does not scroll
//! sideways. Screenshots land in $CARGO_TARGET_TMPDIR/status-page/.

use punch_lab::browser::Browser;
use punch_lab::harness::{run, ServerProc};
use std::time::Duration;

const TOKEN: &str = "status-page-token";
const T: Duration = Duration::from_secs(20);

#[test]
fn the_status_page_updates_itself_from_the_event_stream() {
    let missing = punch_lab::harness::missing_tools(&[("chromium", "chromium")]);
    if !punch_lab::harness::ready("the status page in a browser", &missing) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--token", TOKEN]).unwrap();
    let _a = s
        .serve(dir.path(), "gpu-a", &["--token", TOKEN, "--type", "gpu"])
        .unwrap();
    let url = format!("http://{}/?token={TOKEN}", s.http);
    let mut b = Browser::open(&url, dir.path(), &[]).unwrap();
    b.viewport(1280, 1000, false).unwrap();
    b.wait_for(
        "document.getElementById('live').textContent === 'live' && [...document.querySelectorAll('#workers td.worker')].map(e => e.textContent).join() === 'gpu-a'",
        T,
    )
    .unwrap();
    // Gone after a reload: proves the updates below come without one.
    b.eval("window.sameDocument = 42").unwrap();

    let _b = s
        .serve(dir.path(), "cpu-b", &["--token", TOKEN, "--type", "cpu"])
        .unwrap();
    b.wait_for(
        "[...document.querySelectorAll('#workers td.worker')].some(e => e.textContent === 'cpu-b') && document.getElementById('online').textContent === '2'",
        T,
    )
    .unwrap();
    assert_eq!(
        b.eval("window.sameDocument").unwrap(),
        42,
        "the page reloaded"
    );

    for extra in [&[][..], &["--force-relay"][..]] {
        let mut cmd = s.agent().unwrap();
        cmd.args(["--token", TOKEN])
            .args(extra)
            .args(["connect", "cpu-b", "--json"]);
        let r = run(cmd, Duration::from_secs(60)).unwrap();
        assert_eq!(r.code, Some(0), "connect {extra:?}: {}", r.stderr);
    }
    // Both connects in the table with their path, the direct one with its
    // strategy; the heatmap has a cell; the histogram has bars.
    b.wait_for(
        "(() => { const rows = [...document.querySelectorAll('#recent tr')].map(r => r.innerText); \
           return rows.some(r => r.includes('cpu-b') && r.includes('direct') && r.includes('plain')) \
               && rows.some(r => r.includes('cpu-b') && r.includes('relayed') && r.includes('forced')); })()",
        T,
    )
    .unwrap();
    assert_eq!(
        b.eval("window.sameDocument").unwrap(),
        42,
        "the page reloaded"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#heatmap td.cell:not(.none)').length >= 1")
            .unwrap(),
        true,
        "no heatmap cell"
    );
    assert_eq!(
        b.eval("[...document.querySelectorAll('#histogram rect')].filter(r => +r.getAttribute('height') > 0).length")
            .unwrap(),
        2,
        "one direct and one relayed bar"
    );
    assert_eq!(
        b.eval("document.getElementById('connects').textContent")
            .unwrap(),
        "2"
    );
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&shots).unwrap();
    b.screenshot(&shots.join("desktop.png")).unwrap();

    // A phone: the page fits its width; wide tables scroll in their box.
    b.viewport(390, 844, true).unwrap();
    b.wait_for(
        "document.documentElement.scrollWidth <= window.innerWidth + 1",
        T,
    )
    .unwrap();
    b.screenshot(&shots.join("phone.png")).unwrap();
    eprintln!("screenshots in {}", shots.display());
    b.close().unwrap();
}
