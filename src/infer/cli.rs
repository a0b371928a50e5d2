//! `xrayglm chat`: XrayGLM's `cli_demo.py`. One-shot (`--image` + `--prompt`) prints the report;
//! interactive mode asks for an image path, answers the default question, then takes questions;
//! `clear` starts over with a new image, `stop` quits. Tokens stream to the terminal.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::chat::{ChatModel, ChatSettings, Session, DEFAULT_PROMPT_EN};
use crate::tokenizer::ChatGlmTokenizer;
use crate::weights::source::{checkpoint_base, resolve_run};

/// The tokenizer for a model directory: `explicit`, else an `ice_text.model` / `tokenizer.json`
/// in the directory, its checkpoint's base model, then the usual search paths.
pub fn tokenizer_for(dir: &Path, explicit: Option<&Path>) -> Result<ChatGlmTokenizer> {
    if let Some(p) = explicit {
        return ChatGlmTokenizer::from_path(p);
    }
    let p = tokenizer_path_for(dir).context(
        format!("no tokenizer: pass --tokenizer PATH (ChatGLM-6B's ice_text.model), put ice_text.model in the model folder, or set XRAYGLM_TOKENIZER ({})", crate::tokenizer::HOW_TO_GET),
    )?;
    ChatGlmTokenizer::from_path(&p)
}

/// Where the tokenizer of a model folder is: in the folder, in its base model's, or on the
/// search paths ([`crate::tokenizer::find`]).
pub fn tokenizer_path_for(dir: &Path) -> Option<std::path::PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    let ck = resolve_run(dir);
    if let Ok(base) = checkpoint_base(&ck) {
        dirs.push(base);
    }
    for d in dirs {
        for f in ["ice_text.model", "tokenizer.json"] {
            if d.join(f).is_file() {
                return Some(d.join(f));
            }
        }
    }
    crate::tokenizer::find(None)
}

/// Options of the terminal chat.
pub struct CliOptions {
    /// One-shot: the films of one study (one `<img>` block each, in order); empty: interactive.
    pub image: Vec<PathBuf>,
    pub prompt: Option<String>,
    pub settings: ChatSettings,
}

fn ask_and_print(
    chat: &ChatModel,
    session: &mut Session,
    query: &str,
    settings: &ChatSettings,
    out: &mut impl Write,
) -> Result<String> {
    let r = chat.ask(session, query, settings, |piece| {
        let _ = write!(out, "{piece}");
        let _ = out.flush();
    })?;
    writeln!(out)?;
    Ok(r)
}

/// Run the chat on `input` / `out` (stdin / stdout in the binary).
pub fn run(
    chat: &ChatModel,
    opts: &CliOptions,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<()> {
    let s = &opts.settings;
    chat.check_max_length(s.max_length)?;
    let default_q = opts.prompt.clone().unwrap_or_else(|| {
        if s.english {
            DEFAULT_PROMPT_EN.to_string()
        } else {
            chat.default_prompt.clone()
        }
    });
    if !opts.image.is_empty() {
        // One-shot: the report for one image (or one study's views).
        let mut session = Session::default();
        let films: Vec<&Path> = opts.image.iter().map(PathBuf::as_path).collect();
        chat.set_image_files(&mut session, &films)?;
        ask_and_print(chat, &mut session, &default_q, s, out)?;
        return Ok(());
    }
    let (ask_image, user, bot) = if s.english {
        (
            "Image path (several views: a.png;b.png; Enter for text-only chat): ",
            "User: ",
            "XrayGLM: ",
        )
    } else {
        (
            "请输入图像路径（多个视图用 ; 分隔，回车进入纯文本对话）：",
            "用户：",
            "XrayGLM：",
        )
    };
    writeln!(
        out,
        "{}",
        if s.english {
            "Welcome to XrayGLM. Type `clear` to start over with a new image, `stop` to quit."
        } else {
            "欢迎使用 XrayGLM 模型，输入图像路径和内容即可进行对话，clear 清空对话历史，stop 终止程序"
        }
    )?;
    let mut line = String::new();
    let mut read = |out: &mut dyn Write, prompt: &str| -> Result<Option<String>> {
        write!(out, "{prompt}")?;
        out.flush()?;
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim().to_string()))
    };
    'images: loop {
        let mut session = Session::default();
        let Some(path) = read(out, ask_image)? else {
            return Ok(());
        };
        if path == "stop" {
            return Ok(());
        }
        if !path.is_empty() {
            // Several views of one study: paths separated by `;`.
            let films: Vec<&Path> = path
                .split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(Path::new)
                .collect();
            if let Err(e) = chat.set_image_files(&mut session, &films) {
                writeln!(out, "error: {e:#}")?;
                continue;
            }
            write!(out, "{user}{default_q}\n{bot}")?;
            if let Err(e) = ask_and_print(chat, &mut session, &default_q, s, out) {
                writeln!(out, "error: {e:#}")?;
            }
        }
        loop {
            let Some(q) = read(out, user)? else {
                return Ok(());
            };
            match q.as_str() {
                "stop" => return Ok(()),
                "clear" => continue 'images,
                "" => continue,
                _ => {}
            }
            write!(out, "{bot}")?;
            if let Err(e) = ask_and_print(chat, &mut session, &q, s, out) {
                writeln!(out, "error: {e:#}")?;
            }
        }
    }
}
