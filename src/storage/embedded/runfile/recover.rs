//! Recovering a damaged run file: the intact runs from its start.

use super::*;

/// Intact runs from the start of a damaged file: (end of the last intact run, their entries).
pub(super) fn scan_runs(
    file: &File,
    version: Version,
    len: u64,
    time_range: TimeRange,
) -> io::Result<(u64, Vec<Entry>)> {
    let mut offset = version.magic().len() as u64;
    let mut entries = Vec::new();
    let mut header = [0u8; MAX_HEADER];
    if version == Version::V3 {
        'frames: while offset < len {
            let available = (len - offset).min(MAX_HEADER as u64) as usize;
            file.read_exact_at(&mut header[..available], offset)?;
            let Some((raw, stored, crc, header_len)) =
                Version::decode_frame_header(&header[..available])
            else {
                break;
            };
            let start = offset + header_len as u64;
            if start + stored as u64 > len {
                break;
            }
            let mut buf = vec![0u8; stored];
            file.read_exact_at(&mut buf, start)?;
            let Some(runs) = frame_runs(&header[..header_len - 4], crc, raw, buf) else {
                break;
            };
            let mut found = Vec::new();
            for run in runs_in(&runs) {
                let Some((min_t, max_t)) = run.and_then(|(_, payload)| time_range(payload)) else {
                    break 'frames;
                };
                let series = run.map_or(0, |(series, _)| series);
                found.push(Entry {
                    series,
                    offset,
                    len: 0,
                    min_t,
                    max_t,
                });
            }
            entries.extend(found);
            offset = start + stored as u64;
        }
    }
    while version != Version::V3 && offset < len {
        let available = (len - offset).min(MAX_HEADER as u64) as usize;
        file.read_exact_at(&mut header[..available], offset)?;
        let Some(((series, run_len, crc), header_len)) =
            version.decode_header(&header[..available])
        else {
            break;
        };
        let start = offset + header_len as u64;
        if run_len > MAX_RUN || start + u64::from(run_len) > len {
            break;
        }
        let mut payload = vec![0u8; run_len as usize];
        file.read_exact_at(&mut payload, start)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        let Some((min_t, max_t)) = time_range(&payload) else {
            break;
        };
        entries.push(Entry {
            series,
            offset,
            len: run_len,
            min_t,
            max_t,
        });
        offset = start + u64::from(run_len);
    }
    entries.sort_by_key(|e| e.series);
    entries.dedup_by_key(|e| e.series);
    Ok((offset, entries))
}
