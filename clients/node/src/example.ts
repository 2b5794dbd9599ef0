// A Node caller of Tally over gRPC, with the code `buf generate` writes to src/gen/
// (protoc-gen-es) and Connect's gRPC transport:
//   node dist/example.js 127.0.0.1:50051 ACCOUNT_ID
// It creates the account, adds 5 credits and prints the balance as JSON. Every mutation
// carries a request id, so a retry of the same call is applied once.
import { randomUUID } from "node:crypto";

import { toJsonString } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AccountsService } from "./gen/tally/v1/accounts_pb.js";
import { CreditsService, GetBalanceResponseSchema } from "./gen/tally/v1/credits_pb.js";

const [target = "127.0.0.1:50051", accountId = "acme"] = process.argv.slice(2);
const transport = createGrpcTransport({ baseUrl: `http://${target}` });
const accounts = createClient(AccountsService, transport);
const credits = createClient(CreditsService, transport);

await accounts.createAccount({ requestId: randomUUID(), account: { accountId } });
await credits.topUp({ requestId: randomUUID(), accountId, amount: "5" });
const balance = await credits.getBalance({ accountId }, { timeoutMs: 5000 });
console.log(toJsonString(GetBalanceResponseSchema, balance));
