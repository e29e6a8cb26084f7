//! The lock-state parser (`vmlock::lockstate::LockState::from_str`): no panic on any text, and
//! a state it accepts prints to a string that parses back to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlock::lockstate::LockState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(state) = text.parse::<LockState>() {
        let printed = state.to_string();
        let again: LockState = printed
            .parse()
            .unwrap_or_else(|e| panic!("{printed:?} from {text:?} does not parse: {e}"));
        assert_eq!(again, state, "{text:?} printed as {printed:?}");
    }
});
