//! Files attached to a request, in the form the model takes them: photos as image blocks
//! (re-encoded within the provider's limits when too large), PDFs as document blocks. Every
//! attachment is also in the conversation's workspace (`/workspace/attachments/NAME`), so a
//! file the model cannot take in its prompt (another type, too large, a model without image
//! input) is still readable by its tools; the user is told which and why.
//!
//! Pure: bytes in, blocks and notes out (decoding and resizing are CPU work: run it on a
//! blocking thread).

use std::io::Cursor;

use base64::Engine as _;
use image::{DynamicImage, ImageFormat, ImageReader};

use super::claude::{ContentBlock, MediaSource, Message};

/// What the model accepts in its prompt besides text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    /// Image blocks (JPEG, PNG, GIF, WebP).
    pub images: bool,
    /// PDF document blocks.
    pub pdfs: bool,
}

impl Accepts {
    /// Images and PDFs (the Anthropic Messages API).
    pub const ALL: Accepts = Accepts {
        images: true,
        pdfs: true,
    };
    /// Text only.
    pub const TEXT: Accepts = Accepts {
        images: false,
        pdfs: false,
    };
}

/// The provider's limits for files in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest image edge sent (larger images are scaled down; Anthropic recommends 1568).
    pub max_edge: u32,
    /// Largest encoded image sent (the API refuses more than 5 MB).
    pub max_image_bytes: usize,
    /// Largest PDF sent (the API's request limit is 32 MB).
    pub max_pdf_bytes: usize,
    /// Images with more pixels than this are not decoded at all (a decompression bomb).
    pub max_decode_pixels: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_edge: 1568,
            max_image_bytes: 5 * 1000 * 1000,
            max_pdf_bytes: 24 << 20,
            max_decode_pixels: 100_000_000,
        }
    }
}

/// What becomes of the attachments: blocks for the prompt and a note per file that did not go
/// in as it was.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// Image and document blocks, in attachment order.
    pub blocks: Vec<ContentBlock>,
    /// For the user: files resized, or left to the workspace, and why.
    pub notes: Vec<String>,
}

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image(ImageFormat),
    Pdf,
    Other,
}

fn sniff(bytes: &[u8]) -> Kind {
    if bytes.starts_with(b"%PDF-") {
        return Kind::Pdf;
    }
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)) => {
            Kind::Image(f)
        }
        _ => Kind::Other,
    }
}

fn mime(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "image/png",
        ImageFormat::Gif => "image/gif",
        ImageFormat::WebP => "image/webp",
        _ => "image/jpeg",
    }
}

fn block(media_type: &str, bytes: &[u8], pdf: bool, name: &str) -> ContentBlock {
    let source = MediaSource::base64(
        media_type,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    );
    if pdf {
        ContentBlock::Document {
            source,
            title: Some(name.to_string()),
        }
    } else {
        ContentBlock::Image { source }
    }
}

/// Whether a file may go into the prompt (an image or a PDF by its first bytes): the others
/// need not be kept in memory.
pub fn may_go_in_prompt(bytes: &[u8]) -> bool {
    sniff(bytes) != Kind::Other
}

/// Places each `(name, bytes)` attachment.
pub fn place(files: &[(String, Vec<u8>)], accepts: Accepts, limits: &Limits) -> Placement {
    let mut out = Placement::default();
    for (name, bytes) in files {
        let in_ws = format!("/workspace/attachments/{name}");
        match sniff(bytes) {
            Kind::Other => {} // read with the tools, as the prompt says; nothing to tell
            Kind::Image(_) if !accepts.images => out.notes.push(format!(
                "{name}: this model takes no images, so it was given {in_ws} to read with its \
                 tools instead"
            )),
            Kind::Pdf if !accepts.pdfs => out.notes.push(format!(
                "{name}: this model takes no PDF documents, so it was given {in_ws} to read with \
                 its tools instead"
            )),
            Kind::Pdf if bytes.len() > limits.max_pdf_bytes => out.notes.push(format!(
                "{name}: a PDF of {} is over the {} the model takes; it was given {in_ws} instead",
                crate::store::human_bytes(bytes.len() as u64),
                crate::store::human_bytes(limits.max_pdf_bytes as u64)
            )),
            Kind::Pdf => out.blocks.push(block("application/pdf", bytes, true, name)),
            Kind::Image(format) => match fit_image(bytes, format, limits) {
                Ok(Fitted::AsIs) => out.blocks.push(block(mime(format), bytes, false, name)),
                Ok(Fitted::Resized {
                    bytes: small,
                    format,
                    from,
                    to,
                }) => {
                    out.blocks.push(block(mime(format), &small, false, name));
                    out.notes.push(format!(
                        "{name}: sent to the model at {}×{} (from {}×{}); the original is in \
                         {in_ws}",
                        to.0, to.1, from.0, from.1
                    ));
                }
                Err(why) => out.notes.push(format!(
                    "{name}: not sent as an image ({why}); it was given {in_ws} instead"
                )),
            },
        }
    }
    out
}

/// An image as sent: unchanged, or scaled down and re-encoded.
#[derive(Debug)]
enum Fitted {
    AsIs,
    Resized {
        bytes: Vec<u8>,
        format: ImageFormat,
        from: (u32, u32),
        to: (u32, u32),
    },
}

fn fit_image(bytes: &[u8], format: ImageFormat, limits: &Limits) -> Result<Fitted, String> {
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("unreadable {format:?}: {e}"))?;
    if u64::from(w) * u64::from(h) > limits.max_decode_pixels {
        return Err(format!("{w}×{h} pixels is too large to decode"));
    }
    // Decoded even when it fits: a damaged file would make the provider refuse the request.
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_decode_pixels.saturating_mul(8));
    reader.limits(decoder_limits);
    let img = reader
        .decode()
        .map_err(|e| format!("unreadable {format:?}: {e}"))?;
    if w.max(h) <= limits.max_edge && bytes.len() <= limits.max_image_bytes {
        return Ok(Fitted::AsIs);
    }
    let scaled = if w.max(h) > limits.max_edge {
        img.resize(
            limits.max_edge,
            limits.max_edge,
            image::imageops::FilterType::Triangle,
        )
    } else {
        img
    };
    let to = (scaled.width(), scaled.height());
    // PNG keeps transparency and line art; photos (and anything still too large) go as JPEG.
    for (format, quality) in [
        (ImageFormat::Png, 0),
        (ImageFormat::Jpeg, 85),
        (ImageFormat::Jpeg, 60),
        (ImageFormat::Jpeg, 35),
    ] {
        if format == ImageFormat::Png && !matches!(scaled, DynamicImage::ImageRgba8(_)) {
            continue;
        }
        let encoded = encode(&scaled, format, quality)?;
        if encoded.len() <= limits.max_image_bytes {
            return Ok(Fitted::Resized {
                bytes: encoded,
                format,
                from: (w, h),
                to,
            });
        }
    }
    Err(format!(
        "still over {} after scaling to {}×{}",
        crate::store::human_bytes(limits.max_image_bytes as u64),
        to.0,
        to.1
    ))
}

fn encode(img: &DynamicImage, format: ImageFormat, quality: u8) -> Result<Vec<u8>, String> {
    let mut out = Cursor::new(Vec::new());
    let r = if format == ImageFormat::Jpeg {
        let rgb = DynamicImage::ImageRgb8(img.to_rgb8());
        rgb.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, quality,
        ))
    } else {
        img.write_to(&mut out, format)
    };
    r.map_err(|e| format!("cannot encode: {e}"))?;
    Ok(out.into_inner())
}

/// Puts `blocks` before the text of the last user message (the request being answered).
pub fn into_last_user_message(history: &mut [Message], blocks: Vec<ContentBlock>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = history
        .iter_mut()
        .rev()
        .find(|m| m.role == super::claude::Role::User)
    {
        let mut content = blocks;
        content.extend(last.content.to_blocks());
        last.content = super::claude::Content::Blocks(content);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| {
            image::Rgba([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8, 255])
        });
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgba8(img)
            .write_to(&mut out, ImageFormat::Png)
            .expect("png");
        out.into_inner()
    }

    fn source(b: &ContentBlock) -> (&str, Vec<u8>) {
        let (ContentBlock::Image { source } | ContentBlock::Document { source, .. }) = b else {
            panic!("not a media block: {b:?}");
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(&source.data)
            .expect("base64");
        (source.media_type.as_str(), data)
    }

    #[test]
    fn a_small_photo_goes_as_it_is_and_a_pdf_as_a_document() {
        let photo = png(64, 48);
        let pdf = b"%PDF-1.4\n%...\n".to_vec();
        let files = vec![
            ("p.png".to_string(), photo.clone()),
            ("d.pdf".to_string(), pdf.clone()),
            ("notes.txt".to_string(), b"hello".to_vec()),
        ];
        let p = place(&files, Accepts::ALL, &Limits::default());
        assert_eq!(p.blocks.len(), 2, "the text file stays in the workspace");
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        assert_eq!(source(&p.blocks[0]), ("image/png", photo));
        assert_eq!(source(&p.blocks[1]), ("application/pdf", pdf));
        assert!(
            matches!(&p.blocks[1], ContentBlock::Document { title: Some(t), .. } if t == "d.pdf")
        );
    }

    #[test]
    fn a_large_photo_is_scaled_to_the_longest_edge_and_the_user_is_told() {
        let limits = Limits {
            max_edge: 100,
            ..Limits::default()
        };
        let p = place(&[("big.png".into(), png(400, 200))], Accepts::ALL, &limits);
        assert_eq!(p.blocks.len(), 1);
        let (_, data) = source(&p.blocks[0]);
        let img = image::load_from_memory(&data).expect("decodes");
        assert_eq!((img.width(), img.height()), (100, 50));
        assert_eq!(p.notes.len(), 1);
        assert!(
            p.notes[0].contains("100×50 (from 400×200)"),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn over_the_byte_limit_it_is_reencoded_as_jpeg() {
        let limits = Limits {
            max_image_bytes: 20_000,
            ..Limits::default()
        };
        let big = png(300, 300);
        assert!(big.len() > 20_000, "the test image must be over the limit");
        let p = place(&[("noisy.png".into(), big)], Accepts::ALL, &limits);
        let (mime, data) = source(&p.blocks[0]);
        assert_eq!(mime, "image/jpeg");
        assert!(data.len() <= 20_000);
    }

    #[test]
    fn a_model_without_image_input_gets_the_workspace_and_the_user_is_told() {
        let files = vec![
            ("p.png".to_string(), png(8, 8)),
            ("d.pdf".to_string(), b"%PDF-1.7".to_vec()),
        ];
        let p = place(&files, Accepts::TEXT, &Limits::default());
        assert!(p.blocks.is_empty());
        assert_eq!(p.notes.len(), 2);
        assert!(
            p.notes[0].contains("takes no images")
                && p.notes[0].contains("/workspace/attachments/p.png")
        );
        assert!(p.notes[1].contains("takes no PDF"));
    }

    #[test]
    fn broken_and_oversized_images_are_left_to_the_workspace_without_a_panic() {
        let mut truncated = png(300, 300);
        truncated.truncate(200);
        let bomb_limits = Limits {
            max_decode_pixels: 100,
            ..Limits::default()
        };
        let p = place(
            &[("t.png".into(), truncated)],
            Accepts::ALL,
            &Limits::default(),
        );
        assert!(p.blocks.is_empty());
        assert!(p.notes[0].contains("not sent as an image"), "{:?}", p.notes);
        let p = place(&[("b.png".into(), png(20, 20))], Accepts::ALL, &bomb_limits);
        assert!(p.notes[0].contains("too large to decode"), "{:?}", p.notes);
        let p = place(
            &[(
                "huge.pdf".into(),
                [b"%PDF-".as_slice(), &vec![0; 2048]].concat(),
            )],
            Accepts::ALL,
            &Limits {
                max_pdf_bytes: 1024,
                ..Limits::default()
            },
        );
        assert!(
            p.blocks.is_empty() && p.notes[0].contains("over the"),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn blocks_go_before_the_text_of_the_request() {
        let mut history = vec![
            Message::user("earlier"),
            Message::assistant("answer"),
            Message::user("what is in the photo?"),
        ];
        let p = place(
            &[("p.png".into(), png(4, 4))],
            Accepts::ALL,
            &Limits::default(),
        );
        into_last_user_message(&mut history, p.blocks);
        let blocks = history[2].content.to_blocks();
        assert!(matches!(blocks[0], ContentBlock::Image { .. }));
        assert_eq!(blocks[1], ContentBlock::text("what is in the photo?"));
        assert_eq!(
            history[0].content.to_blocks().len(),
            1,
            "earlier turns unchanged"
        );
    }
}
