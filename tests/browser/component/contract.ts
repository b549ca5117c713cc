// The React player's view of the API is the API's contract: tsc (strict,
// in .ci/run) fails when web/RecordingPlayer.tsx and docs/openapi.json,
// which the daemon's code generates, disagree on the recording answer.
//
// openapi.gen.ts is generated from the committed document, never edited:
// `npm run types` here (.ci/run runs it before tsc). The check lives here,
// not in the component, so the UI team still copies one self-contained
// file.
import type { components, paths } from './openapi.gen';
import type { RecordingResponse, RecordingStatus } from '../../../web/RecordingPlayer';

/** True only when A and B are the same type (not merely assignable). */
type Equal<A, B> =
  (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
type Assert<T extends true> = T;

type Answer =
  paths['/v1/intakes/{id}/recording']['get']['responses'][200]['content']['application/json'];

export type Contract = [
  Assert<Equal<RecordingResponse, Answer>>,
  Assert<Equal<RecordingStatus, components['schemas']['RecordingStatus']>>,
];
