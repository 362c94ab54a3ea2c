//! espeak-ng, loaded at run time from `libespeak-ng.so.1` (Debian `libespeak-ng1`): the
//! phonemizer of the Piper voice and the instant fallback voice.
//!
//! espeak-ng keeps global state (one voice, one callback, not thread-safe), so one dedicated
//! thread owns the library and every call is a request to it. Loading at run time (rather
//! than linking) keeps the build free of the C library: a machine without it builds fine and
//! gets a clear error when a local voice is first used.

use std::ffi::{CStr, CString, c_char, c_int, c_short, c_uint, c_void};
use std::sync::{OnceLock, mpsc};

use crate::Error;

/// The library espeak-ng installs (the unversioned `.so` needs the -dev package).
const LIBRARY: &str = "libespeak-ng.so.1";
/// `AUDIO_OUTPUT_SYNCHRONOUS`: `espeak_Synth` returns when done, audio via the callback.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakCHARS_UTF8`.
const CHARS_UTF8: c_int = 1;
/// `espeakPHONEMES_IPA` in `espeak_TextToPhonemes`' phoneme mode.
const PHONEMES_IPA: c_int = 0x02;
/// `POS_CHARACTER`.
const POS_CHARACTER: c_int = 1;
/// `espeakRATE`.
const PARAM_RATE: c_int = 1;
/// Speaking rate of the fallback voice in words per minute (espeak's default 175 is hurried).
const FALLBACK_RATE_WPM: c_int = 165;
/// Requests queued to the espeak thread; callers wait for their reply anyway.
const REQUEST_CAPACITY: usize = 16;

type SynthCallback = unsafe extern "C" fn(*mut c_short, c_int, *mut c_void) -> c_int;

struct Api {
    _lib: libloading::Library,
    text_to_phonemes: unsafe extern "C" fn(*mut *const c_void, c_int, c_int) -> *const c_char,
    synth: unsafe extern "C" fn(
        *const c_void,
        usize,
        c_uint,
        c_int,
        c_uint,
        c_uint,
        *mut c_uint,
        *mut c_void,
    ) -> c_int,
    sample_rate: u32,
}

enum Request {
    Phonemes(String, mpsc::SyncSender<Result<Vec<String>, Error>>),
    Speak(String, mpsc::SyncSender<Result<Vec<i16>, Error>>),
}

/// A handle to the espeak-ng thread. Cloneable; the thread lives as long as the process.
#[derive(Clone)]
pub struct Espeak {
    requests: mpsc::SyncSender<Request>,
    pub sample_rate: u32,
}

thread_local! {
    /// Samples of the current `espeak_Synth` call (only the espeak thread touches it).
    static SYNTH_BUFFER: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
}

unsafe extern "C" fn collect_samples(wav: *mut c_short, n: c_int, _events: *mut c_void) -> c_int {
    if !wav.is_null() && n > 0 {
        // SAFETY: espeak passes `n` valid samples at `wav` for the duration of the call.
        let samples = unsafe { std::slice::from_raw_parts(wav, n as usize) };
        SYNTH_BUFFER.with(|b| b.borrow_mut().extend_from_slice(samples));
    }
    0
}

impl Espeak {
    /// The process-wide espeak thread, started on first use with the `en-us` voice.
    pub fn global() -> Result<Espeak, Error> {
        static GLOBAL: OnceLock<Result<Espeak, String>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Espeak::start("en-us").map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Espeak)
    }

    fn start(voice: &str) -> Result<Espeak, Error> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (tx, rx) = mpsc::sync_channel::<Request>(REQUEST_CAPACITY);
        let voice = voice.to_string();
        std::thread::Builder::new()
            .name("espeak-ng".into())
            .spawn(move || {
                let api = match load(&voice) {
                    Ok(api) => {
                        let _ = ready_tx.send(Ok(api.sample_rate));
                        api
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(req) = rx.recv() {
                    match req {
                        Request::Phonemes(text, reply) => {
                            let _ = reply.send(phonemes(&api, &text));
                        }
                        Request::Speak(text, reply) => {
                            let _ = reply.send(speak(&api, &text));
                        }
                    }
                }
            })
            .map_err(|e| Error::Espeak(format!("cannot start the espeak thread: {e}")))?;
        let sample_rate = ready_rx
            .recv()
            .map_err(|_| Error::Espeak("espeak thread died while loading".into()))??;
        Ok(Espeak {
            requests: tx,
            sample_rate,
        })
    }

    /// IPA phonemes of each clause of `text`, in order (punctuation is not included).
    pub fn phonemes(&self, text: &str) -> Result<Vec<String>, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.requests
            .send(Request::Phonemes(text.to_string(), tx))
            .map_err(|_| Error::Espeak("espeak thread is gone".into()))?;
        rx.recv()
            .map_err(|_| Error::Espeak("espeak thread is gone".into()))?
    }

    /// The fallback voice: 16-bit samples at [`Espeak::sample_rate`].
    pub fn speak(&self, text: &str) -> Result<Vec<i16>, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.requests
            .send(Request::Speak(text.to_string(), tx))
            .map_err(|_| Error::Espeak("espeak thread is gone".into()))?;
        rx.recv()
            .map_err(|_| Error::Espeak("espeak thread is gone".into()))?
    }
}

fn load(voice: &str) -> Result<Api, Error> {
    let missing = |e: libloading::Error| {
        Error::Espeak(format!(
            "cannot load {LIBRARY} ({e}); install it with `apt-get install espeak-ng` \
             (scripts/setup-models.sh does)"
        ))
    };
    // SAFETY: loading espeak-ng runs no initialisers with preconditions; every symbol below is
    // looked up with the signature of espeak-ng's public header (speak_lib.h, 1.51).
    unsafe {
        let lib = libloading::Library::new(LIBRARY).map_err(missing)?;
        let initialize: libloading::Symbol<
            unsafe extern "C" fn(c_int, c_int, *const c_char, c_int) -> c_int,
        > = lib.get(b"espeak_Initialize\0").map_err(missing)?;
        let set_callback: libloading::Symbol<unsafe extern "C" fn(SynthCallback)> =
            lib.get(b"espeak_SetSynthCallback\0").map_err(missing)?;
        let initialize = *initialize;
        let set_callback = *set_callback;
        let set_voice_by_name = *lib.get(b"espeak_SetVoiceByName\0").map_err(missing)?;
        let text_to_phonemes = *lib.get(b"espeak_TextToPhonemes\0").map_err(missing)?;
        let synth = *lib.get(b"espeak_Synth\0").map_err(missing)?;
        let set_parameter: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int =
            *lib.get(b"espeak_SetParameter\0").map_err(missing)?;
        let rate = initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, std::ptr::null(), 0);
        if rate <= 0 {
            return Err(Error::Espeak(
                "espeak_Initialize failed (is espeak-ng-data installed?)".into(),
            ));
        }
        set_callback(collect_samples);
        let name = CString::new(voice).expect("voice names have no NUL");
        let set_voice: unsafe extern "C" fn(*const c_char) -> c_int = set_voice_by_name;
        if set_voice(name.as_ptr()) != 0 {
            return Err(Error::Espeak(format!("espeak-ng has no voice {voice:?}")));
        }
        set_parameter(PARAM_RATE, FALLBACK_RATE_WPM, 0);
        Ok(Api {
            _lib: lib,
            text_to_phonemes,
            synth,
            sample_rate: rate as u32,
        })
    }
}

fn phonemes(api: &Api, text: &str) -> Result<Vec<String>, Error> {
    let c = CString::new(text.replace('\0', " ")).expect("NULs were replaced");
    let mut ptr: *const c_void = c.as_ptr().cast();
    let mut out = Vec::new();
    // espeak_TextToPhonemes converts one clause per call and advances `ptr` (NULL at the end).
    while !ptr.is_null() {
        // SAFETY: `ptr` points into `c`, which outlives the loop; the returned string is owned
        // by espeak and copied before the next call.
        let s = unsafe { (api.text_to_phonemes)(&mut ptr, CHARS_UTF8, PHONEMES_IPA) };
        if s.is_null() {
            break;
        }
        let s = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
        if !s.trim().is_empty() {
            out.push(s);
        }
    }
    Ok(out)
}

fn speak(api: &Api, text: &str) -> Result<Vec<i16>, Error> {
    let c = CString::new(text.replace('\0', " ")).expect("NULs were replaced");
    SYNTH_BUFFER.with(|b| b.borrow_mut().clear());
    // SAFETY: synchronous mode: espeak reads `c` and calls `collect_samples` on this thread
    // before returning.
    let rc = unsafe {
        (api.synth)(
            c.as_ptr().cast(),
            c.as_bytes_with_nul().len(),
            0,
            POS_CHARACTER,
            0,
            CHARS_UTF8 as c_uint,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(Error::Espeak(format!("espeak_Synth failed with {rc}")));
    }
    Ok(SYNTH_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut())))
}
