"use strict";
Object.defineProperty(exports, "__esModule", { value: true });
exports.handler = handler;
// Seed 000's TypeScript use case, with seed 001's ethers: decode ERC-20 Transfer logs handed in by the task
// and keep the large ones (`balance > 1000` in token units), formatted.
//
// Runtime `nodejs`, handler `trace.handler`. ethers comes from the runtime image's vetted set (GET /v1/runtimes);
// the bundle is the compiled trace.js (`tsc` with this folder's tsconfig.json), no node_modules.
const ethers_1 = require("ethers");
const ERC20 = new ethers_1.Interface(['event Transfer(address indexed from, address indexed to, uint256 value)']);
async function handler(event) {
    const { logs, decimals, symbol, min_amount: minAmount } = event.config;
    const minimum = (0, ethers_1.parseUnits)(minAmount, decimals);
    const rows = [];
    for (const log of logs) {
        const parsed = ERC20.parseLog({ topics: log.topics, data: log.data });
        if (parsed === null || parsed.name !== 'Transfer')
            continue;
        const value = parsed.args.value;
        if (value <= minimum)
            continue;
        rows.push({
            tx: log.transactionHash ?? null,
            log_index: log.logIndex ?? null,
            from: parsed.args.from,
            to: parsed.args.to,
            amount: `${(0, ethers_1.formatUnits)(value, decimals)} ${symbol}`,
            raw: value.toString(),
        });
    }
    return { rows };
}
