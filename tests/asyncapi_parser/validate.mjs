// Validates AsyncAPI documents with the AsyncAPI initiative's parser. Reads a JSON array
// of document texts on stdin (one Node start for all of them: starting takes most of the
// time) and prints one array of diagnostics per document, as JSON.
import { Parser } from "@asyncapi/parser";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const documents = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const parser = new Parser();
const reports = [];
for (const text of documents) {
  const { diagnostics } = await parser.parse(text);
  reports.push(diagnostics.map(({ code, message, path, severity }) => ({ code, message, path, severity })));
}
process.stdout.write(JSON.stringify(reports) + "\n");
